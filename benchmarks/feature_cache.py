"""Training-epoch time with and without the feature cache, same config, on this machine.

    python benchmarks/feature_cache.py --encoder resnet101 --grid 14
    python benchmarks/feature_cache.py --encoder efficientnet_lite0

Times `--batches` training steps each way on Flickr8k (the staged copy, or the built-in data
when it is absent) and scales to a full epoch; the one-time cost of building the cache is
reported separately. Prints JSON and a Markdown table row.
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from captioning.decoders import build_decoder
from captioning.encoders import build_encoder
from captioning.training.datamodule import CaptionDataModule

ROOT = Path(__file__).resolve().parents[1]
FLICKR8K = Path(os.environ.get("FLICKR8K_ROOT", ROOT.parent / "shared" / "data" / "flickr8k"))


def data_cfg(images: int) -> dict:
    if FLICKR8K.is_dir():
        args = {"root": str(FLICKR8K), "limit_train": images, "limit_val": 8, "limit_test": 8}
        return {
            "name": "flickr8k",
            "args": args,
            "batch_size": 64,
            "eval_batch_size": 64,
            "num_workers": 2,
            "min_word_freq": 1,
            "max_caption_len": 20,
        }
    args = {"num_train": images, "num_val": 8, "num_test": 8, "image_size": 224}
    return {
        "name": "synthetic",
        "args": args,
        "batch_size": 64,
        "eval_batch_size": 64,
        "num_workers": 2,
        "min_word_freq": 1,
        "max_caption_len": 20,
    }


def time_steps(dm: CaptionDataModule, encoder, decoder, batches: int) -> float:
    """Seconds per training step (data loading, frozen encoder if no cache, decoder fwd/bwd)."""
    opt = torch.optim.AdamW(decoder.parameters(), lr=1e-4)
    it = iter(dm.train_dataloader())
    times = []
    for i in range(batches + 1):
        t0 = time.perf_counter()
        batch = next(it)
        if batch.feats is not None:
            feats = batch.feats
        else:
            with torch.no_grad():
                feats = encoder(batch.images)
        caps = batch.captions
        lengths = (caps[:, 1:] != 0).sum(1)  # as the LightningModule trains: no padding steps
        logits, alphas = decoder(feats, caps[:, :-1], lengths=lengths)
        loss = F.cross_entropy(logits.flatten(0, 1), caps[:, 1:].flatten(), ignore_index=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i > 0:  # the first step pays for worker start-up
            times.append(time.perf_counter() - t0)
    return sum(times) / len(times)


def calibrate_batchnorm(encoder, cfg: dict) -> None:
    """Random weights blow up through a deep network (ResNet-101's features overflow fp16): one
    pass in train mode sets the BatchNorm statistics and the output is scaled to unit size.
    The compute, which is all this benchmark times, is unchanged."""
    dm = CaptionDataModule(cfg, cache_dir=tempfile.mkdtemp(), preprocess=encoder.preprocess).load()
    images = next(iter(dm.train_dataloader()))["images"]
    for m in encoder.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch sets the statistics
    encoder.train()
    with torch.no_grad():
        encoder(images)
        # Residual branches still add up over 33 blocks: scale the output to unit size, as a
        # trained network's features are (one division per batch, nothing to time).
        encoder.eval()
        scale = float(encoder(images[:8]).abs().amax())
    forward = encoder.forward
    encoder.forward = lambda x: forward(x) / scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--encoder", default="resnet101")
    p.add_argument("--grid", type=int, default=14)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--images", type=int, default=256, help="training images in the timed subset")
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench"))
    a = p.parse_args()
    torch.manual_seed(0)
    pretrained = a.encoder.startswith("efficientnet_lite")  # offline weights; others random
    encoder = build_encoder(a.encoder, pretrained=pretrained, grid=a.grid, fine_tune="none")
    cfg = data_cfg(a.images)
    if not pretrained:
        calibrate_batchnorm(encoder, cfg)
    encoder.eval()
    with tempfile.TemporaryDirectory() as cache:
        dm = CaptionDataModule(cfg, cache_dir=cache, preprocess=encoder.preprocess).load()
        decoder = build_decoder(
            "soft_attention",
            vocab_size=len(dm.vocab),
            encoder_dim=encoder.out_dim,
            embed_dim=512,
            hidden_dim=512,
            attention_dim=512,
            dropout=0.5,
        )
        without = time_steps(dm, encoder, decoder, a.batches)
        dm2 = CaptionDataModule(cfg, cache_dir=cache, preprocess=encoder.preprocess, vocab=dm.vocab)
        dm2.use_feature_cache(encoder)
        t0 = time.perf_counter()
        dm2.prepare_data()
        build_s = time.perf_counter() - t0
        dm2.setup("fit")
        with_cache = time_steps(dm2, encoder, decoder, a.batches)
    steps_per_epoch = 6000 * 5 // 64 + 1  # Flickr8k train: 6000 images x 5 captions
    result = {
        "encoder": a.encoder,
        "grid": a.grid,
        "data": cfg["name"],
        "batch_size": 64,
        "step_s_without_cache": round(without, 4),
        "step_s_with_cache": round(with_cache, 4),
        "speedup": round(without / with_cache, 2),
        "flickr8k_epoch_min_without_cache": round(without * steps_per_epoch / 60, 1),
        "flickr8k_epoch_min_with_cache": round(with_cache * steps_per_epoch / 60, 1),
        "cache_build_s_per_1000_images": round(build_s / (a.images + 16) * 1000, 1),
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"feature_cache_{a.encoder}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(
        f"| {a.encoder} {a.grid}x{a.grid} | {without:.3f} s | {with_cache:.3f} s | "
        f"{result['speedup']}x |"
    )


if __name__ == "__main__":
    main()
