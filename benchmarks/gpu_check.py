"""The GPU check (`make gpu`): the CUDA test tier, then every GPU benchmark, in one run.

    python benchmarks/gpu_check.py [--out DIR]          # on a CUDA machine: about 5 minutes
    python benchmarks/gpu_check.py --device cpu --quick  # dry run of the same code on a CPU
    python benchmarks/gpu_check.py --only beam,train     # some parts (names below)

Parts, in order, each with its share of the ~6-minute budget (H100 estimates):
  tests       pytest -m gpu (tests/test_gpu.py): equality with the CPU, mixed precision, real
              runs of train.py / evaluate.py without Java                              ~150 s
  peak        a bf16 matrix product (8192^3): the measured matmul ceiling              ~3 s
  beam        batched vs one-image beam search, beam 3 and 5, 1000 images, fp32 and bf16:
              the flickr8k decoder size (hidden 1024, 2542 words) with random weights on
              random 81x1280 features; one image at a time is timed on 250 images and
              scaled to 1000                                                            ~20 s
  test_split  1000 images captioned, encoder included (EfficientNet-Lite2 at 260 px, random
              weights; images already decoded and normalised in host memory), beam 5  ~10 s
  train       ResNet-101 (all layers) + decoder training: images/s and peak memory at batch 64
              and 256; fp32 (and fp32+TF32) / bf16-mixed / 16-mixed; channels_last on/off;
              input from DataLoader workers vs already on the GPU; FLOPs per image, hence the
              fraction of the measured bf16 peak                                       ~100 s
  epoch       a Flickr8k-sized epoch (30,000 captions of 6,000 images) from cached Lite2-size
              features (random fp16 features of the right shape, read through DataLoader
              workers as training does), bf16-mixed, batch 64                          ~25 s
  app         the web app's single-image latency (POST /api/caption, 640x480 JPEG, beam 3) on
              the GPU: p50 / p95 over 50 requests                                      ~15 s
  profile     torch.profiler over the batched beam search: top kernels, launches per step ~5 s

Writes DIR/gpu_check.json (every number, the hardware, the command), DIR/gpu_check.md (the
tables), DIR/pytest.log and DIR/profile.txt; DIR is --out, else $CAPTIONING_BENCH_OUT, else
outputs/bench. Prints one summary line per check, and all of them again at the end. Without
CUDA (and without --device cpu) it prints "no CUDA: skipped" and exits 0. Exit status 1 when
a test failed or a part raised.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import FLICKR8K_VOCAB, LITE2_DIM, LITE2_REGIONS, ROOT, hardware

from captioning.decoders import build_decoder
from captioning.decoding import beam_search

# conf/experiment/flickr8k.yaml's decoder, and its test decoding
DECODER = {"embed_dim": 512, "hidden_dim": 1024, "attention_dim": 512, "alpha_c": 1.0}
IDS = {"start_id": 1, "end_id": 2, "pad_id": 0, "banned": (0, 1, 3), "max_len": 20}
PARTS = ("tests", "peak", "beam", "test_split", "train", "epoch", "app", "profile")


class Check:
    """Collects each part's results and summary lines; times each part."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.dev = torch.device(args.device)
        self.cuda = self.dev.type == "cuda"
        self.quick = args.quick
        self.out = Path(args.out)
        self.results: dict[str, Any] = {}
        self.lines: list[str] = []
        self.md: list[str] = []
        self.failed: list[str] = []

    def say(self, line: str) -> None:
        self.lines.append(line)
        print(line, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0

    def autocast(self, dtype: torch.dtype | None):
        return torch.autocast(self.dev.type, dtype=dtype, enabled=dtype is not None)

    def run(self, name: str, fn: Callable[[], None]) -> None:
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as e:  # one broken part must not cost the others' numbers
            self.failed.append(name)
            self.results[name] = {"error": f"{type(e).__name__}: {e}"}
            self.say(f"{name}: FAILED: {type(e).__name__}: {str(e)[:300]}")
            traceback.print_exc()
        seconds = time.perf_counter() - t0
        self.results.setdefault(name, {})["part_s"] = round(seconds, 1)
        print(f"  ({name}: {seconds:.0f} s)", flush=True)


def flickr8k_decoder(dev: torch.device):
    """The flickr8k experiment's decoder, random weights; <end> biased so that captions end
    after ~11 words as trained ones do (random weights alone would run every caption to 20)."""
    torch.manual_seed(0)
    dec = build_decoder(
        "soft_attention", vocab_size=FLICKR8K_VOCAB, encoder_dim=LITE2_DIM, dropout=0.5, **DECODER
    )
    with torch.no_grad():
        dec.fc.bias[IDS["end_id"]] += 5.4  # p(<end>) ~ 1/12 per step among ~2500 near-equal words
    return dec.eval().to(dev)


def random_features(n: int, dev: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, LITE2_REGIONS, LITE2_DIM, generator=g).relu().to(dev)


def tokens(beams) -> list[tuple[int, ...]]:
    """Each image's best caption."""
    return [tuple(bs[0].tokens) for bs in beams]


def all_beams(beams) -> list[tuple[tuple[int, ...], ...]]:
    """Each image's beams, best first."""
    return [tuple(tuple(h.tokens) for h in bs) for bs in beams]


# --- parts ---------------------------------------------------------------------------------------


def part_tests(c: Check) -> None:
    env = {**os.environ, "CAPTIONING_TEST_DEVICE": c.args.device, "PYTHONUNBUFFERED": "1"}
    # -s: the tests print the images whose captions differ between the devices
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-s", "-rs", "-p", "no:cacheprovider",
           "tests/test_gpu.py"]  # fmt: skip
    if c.quick:  # the plumbing only (the tier on a CPU: CAPTIONING_TEST_DEVICE=cpu pytest -m gpu)
        cmd += ["-k", "tf32 or features_cached"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    (c.out / "pytest.log").write_text(log)
    last = [ln for ln in log.splitlines() if " in " in ln and ("passed" in ln or "failed" in ln)]
    verdict = last[-1].strip("= ") if last else f"exit {proc.returncode}"
    equal = [ln for ln in log.splitlines() if ln.startswith(("beam ", "ckpt: "))]
    c.results["tests"] = {"exit": proc.returncode, "summary": verdict, "differing": equal}
    if proc.returncode != 0:
        c.failed.append("tests")
    c.say(f"tests: pytest -m gpu on {c.args.device}: {verdict}" + (
        f"; {len(equal)} captions differ device/CPU (pytest.log)" if equal else ""))  # fmt: skip


def part_peak(c: Check) -> None:
    n = 256 if c.quick else 8192
    a = torch.randn(n, n, device=c.dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=c.dev, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    reps = 3 if c.quick else 20
    _, s = c.timed(lambda: [a @ b for _ in range(reps)])
    tflops = 2 * n**3 * reps / s / 1e12
    c.results["peak"] = {"bf16_matmul_tflops": round(tflops, 1), "n": n}
    c.say(f"peak: bf16 matmul {n}^3: {tflops:.1f} TFLOP/s")


def part_beam(c: Check) -> None:
    n, single_n = (64, 8) if c.quick else (1000, 250)
    dec, feats = flickr8k_decoder(c.dev), random_features(n, c.dev)
    kw = {k: v for k, v in IDS.items()}
    out: dict[str, Any] = {"images": n, "single_images_timed": single_n, "decoder": DECODER}
    for beam in (3, 5):
        opts = dict(kw, beam_size=beam)
        with torch.no_grad():
            beam_search(dec, feats[:128], **opts)  # warm-up: kernels, allocator
            fp32, t32 = c.timed(lambda o=opts: beam_search(dec, feats, **o))
            with c.autocast(torch.bfloat16):
                beam_search(dec, feats[:128], **opts)
                bf16, t16 = c.timed(lambda o=opts: beam_search(dec, feats, **o))
            for i in range(3):
                beam_search(dec, feats[i : i + 1], **opts)
            singles, ts = c.timed(
                lambda o=opts: [beam_search(dec, feats[i : i + 1], **o)[0] for i in range(single_n)]
            )  # each image's beams
        per_image = ts / single_n
        one_by_one = per_image * n
        pairs = zip(all_beams(fp32[:single_n]), all_beams(singles), strict=True)
        same = sum(a == b for a, b in pairs)
        same_bf16 = sum(a == b for a, b in zip(tokens(fp32), tokens(bf16), strict=True))
        words = statistics.fmean(len(bs[0].tokens) for bs in fp32)
        r = {
            "batched_s": round(t32, 3),
            "batched_bf16_s": round(t16, 3),
            "one_image_ms": round(per_image * 1e3, 2),
            "one_by_one_s_for_all": round(one_by_one, 2),
            "speedup": round(one_by_one / t32, 1),
            "batched_equals_one_by_one": f"{same}/{single_n}",
            "bf16_same_best_caption": f"{same_bf16}/{n}",
            "mean_words": round(words, 2),
        }
        out[f"beam{beam}"] = r
        c.say(
            f"beam {beam}: {n} images batched {t32:.2f} s (bf16 {t16:.2f} s) vs one at a time "
            f"{per_image * 1e3:.1f} ms/image -> {r['speedup']}x; same beams as one at a time "
            f"{same}/{single_n}; bf16 best caption as fp32 {same_bf16}/{n}"
        )
    c.results["beam"] = out
    c.md += [
        "## Beam search, batched vs one image at a time",
        "",
        f"{n} images, flickr8k decoder size ({DECODER}, {FLICKR8K_VOCAB} words), random weights "
        f"and features; one at a time timed on {single_n} images and scaled.",
        "",
        "| beam | batched s | batched bf16 s | one image ms | speedup | same beams | bf16 same |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for beam in (3, 5):
        r = out[f"beam{beam}"]
        c.md.append(
            f"| {beam} | {r['batched_s']} | {r['batched_bf16_s']} | {r['one_image_ms']} | "
            f"{r['speedup']}x | {r['batched_equals_one_by_one']} | {r['bf16_same_best_caption']} |"
        )
    c.md.append("")


def part_test_split(c: Check) -> None:
    from captioning.encoders import build_encoder

    n, size, chunk = (1, 260, 1) if c.quick else (1000, 260, 250)
    torch.manual_seed(0)
    enc = build_encoder("efficientnet_lite2", pretrained=False, grid=None).eval().to(c.dev)
    dec = flickr8k_decoder(c.dev)
    images = torch.randn(n, 3, size, size)  # decoded and normalised already (not timed)
    if c.cuda:
        images = images.pin_memory()
    opts = dict(IDS, beam_size=5, length_penalty=0.4)

    def caption_all(dtype):
        out = []
        with torch.no_grad(), c.autocast(dtype):
            for s in range(0, n, chunk):
                x = images[s : s + chunk].to(c.dev, non_blocking=True)
                out += beam_search(dec, enc(x).float(), **opts)
        return out

    if not c.quick:
        caption_all(None)  # warm-up (cuDNN, allocator)
    _, t32 = c.timed(lambda: caption_all(None))
    if not c.quick:
        caption_all(torch.bfloat16)
    _, t16 = c.timed(lambda: caption_all(torch.bfloat16))
    c.results["test_split"] = {"images": n, "fp32_s": round(t32, 2), "bf16_s": round(t16, 2)}
    c.say(
        f"test_split: {n} images (Lite2 260 px + beam 5) captioned in {t32:.2f} s fp32, "
        f"{t16:.2f} s bf16 (host tensors -> GPU in chunks of {chunk})"
    )
    c.md += [
        "## The test split captioned, encoder included",
        "",
        f"{n} images 260 px, EfficientNet-Lite2 + flickr8k decoder, beam 5, length penalty 0.4: "
        f"**{t32:.2f} s** fp32, {t16:.2f} s bf16 autocast.",
        "",
    ]


def part_train(c: Check) -> None:
    from gpu_train import flops_per_image, train_speed

    if c.cuda:
        torch.backends.cudnn.benchmark = True  # what trainer=gpu sets
    q = c.quick
    base = dict(steps=1 if q else 8, warmup=1 if q else 3, device=c.args.device,
                image_size=32 if q else 224, workers=2 if q else 8)  # fmt: skip
    b64, b256 = (2, 4) if q else (64, 256)
    configs = [
        dict(precision="fp32", batch=b64, input="device"),
        dict(precision="fp32", batch=b64, input="device", tf32=True),
        dict(precision="bf16-mixed", batch=b64, input="device"),
        dict(precision="bf16-mixed", batch=b64, input="device", channels_last=False),
        dict(precision="16-mixed", batch=b64, input="device"),
        dict(precision="16-mixed", batch=b64, input="device", channels_last=False),
        dict(precision="bf16-mixed", batch=b64, input="workers"),
        dict(precision="fp32", batch=b256, input="device", tf32=True),
        dict(precision="bf16-mixed", batch=b256, input="device"),
        dict(precision="bf16-mixed", batch=b256, input="device", channels_last=False),
        dict(precision="16-mixed", batch=b256, input="device"),
        dict(precision="bf16-mixed", batch=b256, input="workers"),
    ]
    if not c.cuda:  # fp16 autocast on a CPU is not what any run uses
        configs = [x for x in configs if x["precision"] != "16-mixed"]
    flops = flops_per_image(c.args.device, batch=2, image_size=base["image_size"])
    peak = c.results.get("peak", {}).get("bf16_matmul_tflops")
    runs = []
    for cfg in configs:
        r = train_speed(**(base | cfg))
        tflops = r["images_per_s"] * flops / 1e12
        r["tflops"] = round(tflops, 1)
        r["of_bf16_peak"] = round(tflops / peak, 3) if peak else None
        runs.append(r)
        c.say(
            f"train: resnet101 b{r['batch']} {r['precision']} channels_last="
            f"{'on' if r['channels_last'] else 'off'} input={r['input']}: "
            f"{r['images_per_s']} images/s, peak {r['peak_memory_gib']} GiB, {r['tflops']} "
            f"TFLOP/s" + (f" ({100 * r['of_bf16_peak']:.1f}% of bf16 peak)" if peak else "")
        )
        if c.cuda:
            torch.cuda.empty_cache()
    c.results["train"] = {"flops_per_image": flops, "runs": runs}
    c.md += [
        "## ResNet-101 (all layers) + decoder training",
        "",
        f"{flops / 1e9:.1f} GFLOP per image per step (forward + backward, FlopCounterMode); "
        f"bf16 matmul peak measured: {peak} TFLOP/s.",
        "",
        "| batch | precision | channels_last | input | images/s | step ms | peak GiB | "
        "TFLOP/s | of bf16 peak |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in runs:
        frac = f"{100 * r['of_bf16_peak']:.1f}%" if r["of_bf16_peak"] else ""
        c.md.append(
            f"| {r['batch']} | {r['precision']} | {'on' if r['channels_last'] else 'off'} | "
            f"{r['input']} | {r['images_per_s']} | {r['step_ms']} | {r['peak_memory_gib']} | "
            f"{r['tflops']} | {frac} |"
        )
    c.md.append("")


def part_epoch(c: Check) -> None:
    import numpy as np
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, Dataset

    images = 20 if c.quick else 6000
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(images, LITE2_REGIONS, LITE2_DIM, generator=g).relu().half()
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.normal(11.8, 3.8, images * 5), 2, 20).astype(int)

    class Cached(Dataset):  # what CaptionDataset gives for cached features: fp32 (N, D) + ids
        def __len__(self) -> int:
            return len(lengths)

        def __getitem__(self, k: int):
            n = int(lengths[k])
            cap = torch.randint(
                4, FLICKR8K_VOCAB, (n + 2,), generator=torch.Generator().manual_seed(k)
            )
            cap[0], cap[-1] = 1, 2
            return feats[k // 5].float(), cap

    def collate(samples):
        return (torch.stack([s[0] for s in samples]),
                torch.nn.utils.rnn.pad_sequence([s[1] for s in samples], batch_first=True))  # fmt: skip

    loader = DataLoader(Cached(), batch_size=64, shuffle=True, num_workers=2 if c.quick else 6,
                        collate_fn=collate, pin_memory=c.cuda, persistent_workers=False)  # fmt: skip
    torch.manual_seed(0)
    dec = (
        build_decoder(
            "soft_attention",
            vocab_size=FLICKR8K_VOCAB,
            encoder_dim=LITE2_DIM,
            dropout=0.5,
            **DECODER,
        )
        .to(c.dev)
        .train()
    )
    opt = torch.optim.AdamW(dec.parameters(), lr=4e-4)

    def epoch():
        steps = 0
        for x, caps in loader:
            x, caps = x.to(c.dev, non_blocking=True), caps.to(c.dev, non_blocking=True)
            inputs, targets = caps[:, :-1], caps[:, 1:]
            with c.autocast(torch.bfloat16):
                logits, alphas = dec(x, inputs, lengths=(targets != 0).sum(1))
                loss = F.cross_entropy(
                    logits.flatten(0, 1).float(), targets.flatten(), ignore_index=0
                )
                loss = loss + dec.regularizer(alphas, (targets != 0).to(alphas.dtype))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dec.parameters(), 5.0)
            opt.step()
            steps += 1
        return steps

    steps, seconds = c.timed(epoch)
    captions = len(lengths)
    c.results["epoch"] = {"captions": captions, "steps": steps, "seconds": round(seconds, 1),
                          "captions_per_s": round(captions / seconds, 1)}  # fmt: skip
    c.say(
        f"epoch: {captions} captions ({images} images' random Lite2-size fp16 features, batch 64, "
        f"bf16-mixed, hidden 1024) in {seconds:.1f} s ({captions / seconds:.0f} captions/s)"
    )
    c.md += [
        "## A Flickr8k-sized epoch from cached features",
        "",
        f"{captions} captions, {steps} steps of 64, bf16-mixed, the flickr8k decoder (hidden "
        f"1024): **{seconds:.1f} s** ({captions / seconds:.0f} captions/s). Features: random fp16 "
        f"of the cache's shape ({LITE2_REGIONS} x {LITE2_DIM}), read through DataLoader workers.",
        "",
    ]


def write_checkpoint(path: Path) -> None:
    """A checkpoint of the flickr8k experiment's architecture, random weights."""
    from captioning.model import build_captioner
    from captioning.vocab import Vocab

    vocab = Vocab([f"word{i}" for i in range(FLICKR8K_VOCAB - 4)])
    enc_cfg = {"name": "efficientnet_lite2", "pretrained": False, "grid": None, "fine_tune": "none"}
    dec_cfg = {"name": "soft_attention", "dropout": 0.5, **DECODER}
    torch.manual_seed(0)
    model = build_captioner(enc_cfg, dec_cfg, len(vocab))
    with torch.no_grad():
        model.decoder.fc.bias[IDS["end_id"]] += 5.4
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "captioning": {
                "format": 1, "encoder": enc_cfg, "decoder": dec_cfg, "vocab": vocab.to_dict(),
                "preprocess": model.encoder.preprocess.to_dict(), "data": {}, "metrics": {},
                "monitor": "val/bleu4",
            },
        },
        path,
    )  # fmt: skip


def part_app(c: Check) -> None:
    try:
        from fastapi.testclient import TestClient
    except ImportError as e:
        c.results["app"] = {"skipped": str(e)}
        c.say(f"app: skipped, the web app needs fastapi and httpx ({e}); pip install fastapi httpx")
        return
    from app_latency import percentiles, photo_jpeg

    from captioning.app import create_app

    n, warmup = (5, 1) if c.quick else (50, 5)
    threads = torch.get_num_threads()  # the app sets its own (one); the parts after it keep theirs
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "flickr8k_arch.ckpt"
        write_checkpoint(ckpt)
        data, _ = photo_jpeg()
        files = {"file": ("photo.jpg", data, "image/jpeg")}
        with TestClient(create_app(ckpt, device=c.args.device)) as client:
            for _ in range(warmup):
                client.post("/api/caption", params={"beam_size": 3}, files=files).raise_for_status()
            wall, model = [], []
            for _ in range(n):
                t0 = time.perf_counter()
                r = client.post("/api/caption", params={"beam_size": 3}, files=files)
                wall.append((time.perf_counter() - t0) * 1e3)
                r.raise_for_status()
                model.append(r.json()["timings_ms"]["model"])
            device = client.get("/api/model").json().get("device")
    torch.set_num_threads(threads)
    p = percentiles(wall)
    p["model_p50_ms"] = round(statistics.median(model), 1)
    p["device"] = device
    c.results["app"] = {"requests": n, **p}
    c.say(
        f"app: POST /api/caption 640x480 JPEG, beam 3, on {device}: p50 {p['p50_ms']} ms, p95 "
        f"{p['p95_ms']} ms (model part p50 {p['model_p50_ms']} ms), {n} requests"
    )
    c.md += [
        "## Web app, single-image latency",
        "",
        f"`POST /api/caption` (640x480 JPEG, beam 3, attention maps in the answer) in-process "
        f"(FastAPI TestClient), model on {device}, Lite2 + flickr8k decoder: p50 **{p['p50_ms']} "
        f"ms**, p95 **{p['p95_ms']} ms** ({n} requests; model part p50 {p['model_p50_ms']} ms).",
        "",
    ]


def part_profile(c: Check) -> None:
    from torch.profiler import ProfilerActivity, profile

    n = 32 if c.quick else 250
    dec, feats = flickr8k_decoder(c.dev), random_features(n, c.dev)
    opts = dict(IDS, beam_size=3)
    steps = [0]
    step_grouped = dec.step_grouped

    def counted(*a, **k):
        steps[0] += 1
        return step_grouped(*a, **k)

    with torch.no_grad():
        beam_search(dec, feats, **opts)
        dec.step_grouped = counted
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if c.cuda else [])
        with profile(activities=activities) as prof:
            beam_search(dec, feats, **opts)
            c.sync()
        del dec.step_grouped
    events = prof.key_averages()
    sort = "device_time_total" if c.cuda else "cpu_time_total"
    table = events.table(sort_by=sort, row_limit=15)
    (c.out / "profile.txt").write_text(table)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))
    per_step = launches / max(steps[0], 1)
    c.results["profile"] = {"images": n, "decoding_steps": steps[0], "kernel_launches": launches,
                            "launches_per_step": round(per_step, 1)}  # fmt: skip
    top = sorted(events, key=lambda e: getattr(e, "device_time_total" if c.cuda else "cpu_time_total", 0),
                 reverse=True)[:3]  # fmt: skip
    names = ", ".join(e.key[:40] for e in top)
    c.say(
        f"profile: beam 3 over {n} images: {steps[0]} decoding steps, {launches} kernel launches "
        f"({per_step:.0f} per step); top: {names} (profile.txt)"
    )
    c.md += ["## Profile of the batched beam search (beam 3)", "", "```", table, "```", ""]


# -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--out", default=os.environ.get("CAPTIONING_BENCH_OUT", str(ROOT / "outputs" / "bench"))
    )
    p.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the logic")
    p.add_argument(
        "--quick", action="store_true", help="small sizes: check the code, not the speed"
    )
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts of {PARTS}")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA: skipped")
        return 0
    parts = [x for x in args.only.split(",") if x]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown part(s) {unknown}; valid: {', '.join(PARTS)}")
    c = Check(args)
    c.out.mkdir(parents=True, exist_ok=True)
    hw = hardware()
    c.results["hardware"] = hw
    c.results["command"] = " ".join(["python benchmarks/gpu_check.py", *(argv or sys.argv[1:])])
    c.say(f"device: {hw['cuda'] or hw['cpu']} (torch {hw['torch']}); parts: {', '.join(parts)}")
    t0 = time.perf_counter()
    for name in PARTS:
        if name in parts:
            c.run(name, lambda name=name: globals()[f"part_{name}"](c))
    total = time.perf_counter() - t0
    c.results["total_s"] = round(total, 1)
    c.results["summary"] = c.lines
    (c.out / "gpu_check.json").write_text(json.dumps(c.results, indent=2, default=str))
    head = [f"# GPU check: {hw['cuda'] or hw['cpu']}", "", f"`{c.results['command']}`, torch "
            f"{hw['torch']}, {total:.0f} s in all.", "", "Summary:", "", *[f"- {x}" for x in c.lines], ""]  # fmt: skip
    (c.out / "gpu_check.md").write_text("\n".join(head + c.md))
    print("\n== summary ==")
    for line in c.lines:
        print(line)
    print(f"total {total:.0f} s; wrote {c.out / 'gpu_check.json'} and gpu_check.md"
          + (f"; FAILED: {', '.join(c.failed)}" if c.failed else ""))  # fmt: skip
    return 1 if c.failed else 0


if __name__ == "__main__":
    sys.exit(main())
