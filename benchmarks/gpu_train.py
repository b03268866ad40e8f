"""Images/s and peak GPU memory of full ResNet-101 + attention decoder training, on CUDA.

    python benchmarks/gpu_train.py                       # fp32 and bf16-mixed, batch 64
    python benchmarks/gpu_train.py --precision fp32,bf16-mixed,16-mixed --batch 256
    python benchmarks/gpu_train.py --no-channels-last --input device --tf32

Without a CUDA device it says so, writes {"skipped": ...} to outputs/bench/gpu_train.json and
exits 0, so `make bench` runs everywhere. `benchmarks/gpu_check.py` (`make gpu`) runs a matrix
of these settings through `train_speed`.

One step: a batch of images (3x224x224) through ResNet-101 (every layer trained, random
weights: speed does not depend on them), 7x7x2048 regions, the flickr8k decoder (embed,
hidden, attention 512, 2542 words) teacher-forced on captions with Flickr8k-like lengths
(fast path with lengths), cross-entropy + attention regulariser, backward, AdamW. Mixed
precision as Lightning's bf16-mixed / 16-mixed do it: autocast around the forward, fp32
weights, a GradScaler for fp16. Input: `workers` decode random uint8 pixels into normalised
images in DataLoader workers (pinned, copied non-blocking), as training does; `device` cycles
through batches made on the GPU beforehand, the ceiling without input costs. Peak memory is
torch.cuda.max_memory_allocated per setting.
"""

from __future__ import annotations

import argparse
import itertools
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
PRECISIONS = {"fp32": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


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


def build_model(device: torch.device, channels_last: bool = True, image_size: int = 224):
    torch.manual_seed(0)
    model = build_captioner(
        {"name": "resnet101", "pretrained": False, "grid": 7, "fine_tune": "all",
         "image_size": image_size, "channels_last": channels_last},
        {"name": "soft_attention", "dropout": 0.5, **FLICKR8K_DECODER},
        FLICKR8K_VOCAB,
    )  # fmt: skip
    return model.to(device)


def train_step(model, opt, scaler, images, caps, dtype, device_type: str):
    inputs, targets = caps[:, :-1], caps[:, 1:]
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        feats = model.encode(images)  # (B, 49, 2048)
        logits, alphas = model.decoder(feats, inputs, lengths=(targets != 0).sum(1))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0)
        loss = ce + model.decoder.regularizer(alphas, (targets != 0).to(alphas.dtype))
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss


def flops_per_image(device: str = "cuda", batch: int = 4, image_size: int = 224) -> float:
    """Floating-point operations of one training step (forward + backward), per image."""
    from torch.utils.flop_counter import FlopCounterMode

    dev = torch.device(device)
    model = build_model(dev, image_size=image_size)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    images, caps = collate([RandomImages(batch, image_size)[i] for i in range(batch)])
    with FlopCounterMode(display=False) as counter:
        train_step(model, opt, scaler, images.to(dev), caps.to(dev), None, dev.type)
    return counter.get_total_flops() / batch


def train_speed(
    precision: str = "fp32",
    *,
    batch: int = 64,
    steps: int = 20,
    warmup: int = 5,
    channels_last: bool = True,
    input: str = "workers",
    workers: int = 8,
    tf32: bool = False,
    compile: bool = False,
    device: str = "cuda",
    image_size: int = 224,
) -> dict:
    """Time `steps` training steps after `warmup` ones; images/s, step time, peak memory."""
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    dtype = PRECISIONS[precision]
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build_model(dev, channels_last, image_size)
    if compile:
        model.decoder.compile_step()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type, enabled=precision == "16-mixed")
    if input == "device":  # a few batches made once on the device, used in turn
        data = RandomImages(batch * 2, image_size)
        made = [collate([data[i] for i in range(k * batch, (k + 1) * batch)]) for k in range(2)]
        made = [(im.to(dev), cap.to(dev)) for im, cap in made]
        loader = itertools.islice(itertools.cycle(made), steps + warmup)
    elif input == "workers":
        loader = DataLoader(
            RandomImages(batch * (steps + warmup), image_size),
            batch_size=batch,
            num_workers=workers,
            pin_memory=cuda,
            collate_fn=collate,
            persistent_workers=workers > 0,
            prefetch_factor=4 if workers else None,
        )
    else:
        raise ValueError(f"input must be workers or device, got {input!r}")
    t0 = None
    for i, (images, caps) in enumerate(loader):
        if i == warmup:  # after cuDNN autotuning and allocator warm-up; data waits count
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        images = images.to(dev, non_blocking=True)
        caps = caps.to(dev, non_blocking=True)
        loss = train_step(model, opt, scaler, images, caps, dtype, dev.type)
    if cuda:
        torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / steps
    return {
        "precision": precision + ("+tf32" if tf32 and precision == "fp32" else ""),
        "batch": batch,
        "channels_last": channels_last,
        "input": input,
        "images_per_s": round(batch / step, 1),
        "step_ms": round(step * 1e3, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "steps_timed": steps,
        "loss": round(float(loss.detach()), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--precision", default="fp32,bf16-mixed")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--input", choices=["workers", "device"], default="workers")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="encoder and images in NHWC (the encoders' default)",
    )
    p.add_argument("--tf32", action="store_true", help="TF32 for fp32 matmuls and convolutions")
    p.add_argument("--compile", action="store_true", help="decoder.compile_step()")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test
    a = p.parse_args()
    result = {
        "benchmark": "gpu_train",
        "hardware": hardware(),
        "command": " ".join(["python benchmarks/gpu_train.py", *sys.argv[1:]]),
    }
    opts = dict(
        batch=a.batch, steps=a.steps, warmup=a.warmup, channels_last=a.channels_last,
        input=a.input, workers=a.workers, tf32=a.tf32, compile=a.compile, device=a.device,
    )  # fmt: skip
    if a.device == "cpu":  # check the code path, time nothing
        print({k: train_speed(k, **opts) for k in a.precision.split(",")})
        return
    if not torch.cuda.is_available():
        result["skipped"] = "no CUDA device on this machine: nothing measured"
        print(write_result("gpu_train", result))
        print("gpu_train: skipped, no CUDA device (run it where `torch.cuda.is_available()`)")
        return
    torch.backends.cudnn.benchmark = True
    result.update(
        {k: opts[k] for k in ("batch", "workers", "input", "channels_last", "tf32")}
        | {"pin_memory": True, "runs": {}}
    )
    for precision in a.precision.split(","):
        result["runs"][precision] = train_speed(precision, **opts)
        print(precision, result["runs"][precision], flush=True)
    result["load_avg"] = load_avg()
    print(write_result("gpu_train", result))
    print("\n| precision | images/s | step ms | peak GPU memory GiB |")
    print("| --- | --- | --- | --- |")
    for k, r in result["runs"].items():
        print(f"| {k} | {r['images_per_s']} | {r['step_ms']} | {r['peak_memory_gib']} |")


if __name__ == "__main__":
    main()
