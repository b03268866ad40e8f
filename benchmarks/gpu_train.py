"""Images/s and peak GPU memory of full ResNet-101 + attention decoder training, on CUDA.

    python benchmarks/gpu_train.py                       # fp32 and bf16-mixed, batch 64
    python benchmarks/gpu_train.py --precision fp32,bf16-mixed,16-mixed --workers 8

Without a CUDA device it says so, writes {"skipped": ...} to outputs/bench/gpu_train.json and
exits 0, so `make bench` runs everywhere.

One step: a batch of 64 images (3x224x224, decoded and normalised by DataLoader workers from
random uint8 pixels, pinned, copied non-blocking) through ResNet-101 (every layer trained,
random weights: speed does not depend on them), 7x7x2048 regions, the flickr8k decoder (embed,
hidden, attention 512, 2542 words) teacher-forced on captions with Flickr8k-like lengths
(fast path with lengths), cross-entropy + attention regulariser, backward, AdamW. Mixed
precision as Lightning's bf16-mixed / 16-mixed do it: autocast around the forward, fp32
weights, a GradScaler for fp16. Peak memory is torch.cuda.max_memory_allocated per precision.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from common import FLICKR8K_DECODER, FLICKR8K_VOCAB, hardware, load_avg, write_result
from torch.utils.data import DataLoader, Dataset

from captioning.model import build_captioner

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)


class RandomImages(Dataset):
    """Random uint8 photos, normalised like the encoder's preprocessing, with a caption each."""

    def __init__(self, n: int, size: int = 224, max_len: int = 21):
        self.n, self.size, self.max_len = n, size, max_len

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (3, self.size, self.size), dtype=torch.uint8, generator=g)
        image = (pixels.float() / 255 - MEAN) / STD
        n = int(np.clip(np.random.default_rng(i).normal(11.8, 3.8), 2, self.max_len - 1))
        caption = torch.randint(4, FLICKR8K_VOCAB, (n + 2,), generator=g)
        caption[0], caption[-1] = 1, 2  # <start> .. <end>
        return image, caption


def collate(samples):
    images = torch.stack([s[0] for s in samples])
    caps = torch.nn.utils.rnn.pad_sequence([s[1] for s in samples], batch_first=True)
    return images, caps


def run(precision: str, a: argparse.Namespace) -> dict:
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = build_captioner(
        {"name": "resnet101", "pretrained": False, "grid": 7, "fine_tune": "all"},
        {"name": "soft_attention", "dropout": 0.5, **FLICKR8K_DECODER},
        FLICKR8K_VOCAB,
    ).to(device)
    if a.channels_last:
        model.encoder.to(memory_format=torch.channels_last)
    if a.compile:
        model.decoder.compile_step()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "16-mixed")
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)
    loader = DataLoader(
        RandomImages(a.batch * (a.steps + a.warmup)),
        batch_size=a.batch,
        num_workers=a.workers,
        pin_memory=True,
        collate_fn=collate,
        persistent_workers=a.workers > 0,
        prefetch_factor=4 if a.workers else None,
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = None
    for i, (images, caps) in enumerate(loader):
        if i == a.warmup:  # after cuDNN autotuning and allocator warm-up; data waits count
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        images = images.to(device, non_blocking=True)
        if a.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        caps = caps.to(device, non_blocking=True)
        inputs, targets = caps[:, :-1], caps[:, 1:]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            feats = model.encode(images)  # (B, 49, 2048)
            logits, alphas = model.decoder(feats, inputs, lengths=(targets != 0).sum(1))
            ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0)
            loss = ce + model.decoder.regularizer(alphas, (targets != 0).to(alphas.dtype))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    if cuda:
        torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / a.steps
    return {
        "images_per_s": round(a.batch / step, 1),
        "step_ms": round(step * 1e3, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "steps_timed": a.steps,
        "loss": round(float(loss.detach()), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32,bf16-mixed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="decoder.compile_step()")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test
    a = p.parse_args()
    result = {
        "benchmark": "gpu_train",
        "hardware": hardware(),
        "command": " ".join(["python benchmarks/gpu_train.py", *sys.argv[1:]]),
    }
    if a.device == "cpu":  # check the code path, time nothing
        print({k: run(k, a) for k in a.precision.split(",")})
        return
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device on this machine: nothing measured"
        print(write_result("gpu_train", result))
        print("gpu_train: skipped, no CUDA device (run it where `torch.cuda.is_available()`)")
        return
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here; TF32 would be a
    torch.backends.cudnn.allow_tf32 = False  # third precision, not the baseline
    result.update(
        {
            "batch": a.batch,
            "workers": a.workers,
            "pin_memory": True,
            "channels_last": a.channels_last,
            "runs": {},
        }
    )
    for precision in a.precision.split(","):
        result["runs"][precision] = run(precision, a)
        print(precision, result["runs"][precision], flush=True)
        torch.cuda.empty_cache()
    result["load_avg"] = load_avg()
    print(write_result("gpu_train", result))
    print("\n| precision | images/s | step ms | peak GPU memory GiB |")
    print("| --- | --- | --- | --- |")
    for k, r in result["runs"].items():
        print(f"| {k} | {r['images_per_s']} | {r['step_ms']} | {r['peak_memory_gib']} |")


if __name__ == "__main__":
    main()
