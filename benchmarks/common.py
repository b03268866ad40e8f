"""Shared by the benchmarks: the machine, timing under load, the Flickr8k model and features.

This machine is shared, so every result records the load average beside it, and timings are
taken as CPU time of this process as well as wall time: CPU time is what the work costs and
moves less when other processes compete for the cores; wall time under load is an upper bound.
"""

from __future__ import annotations

import glob
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "outputs" / "bench"
# The project's cache root (converted datasets, feature caches): paths.cache_dir's default,
# and the same environment variable overrides it.
CACHE = Path(os.environ.get("CAPTIONING_CACHE", ROOT / "outputs" / "cache"))
FEATURES = CACHE / "features"

# The flickr8k experiment's decoder (conf/experiment/flickr8k.yaml) on EfficientNet-Lite2's
# 9x9x1280 map, with the vocabulary a Flickr8k run builds (2543 words with min_word_freq 5).
FLICKR8K_DECODER = {"embed_dim": 512, "hidden_dim": 1024, "attention_dim": 512, "alpha_c": 1.0}
# the decoders of experiment=flickr8k and experiment=flickr8k_updown, by name
DECODER_SIZES = {
    "soft_attention": FLICKR8K_DECODER,
    "updown": {"embed_dim": 512, "hidden_dim": 1024, "attention_dim": 512, "alpha_c": 0.0},
}
FLICKR8K_VOCAB, LITE2_REGIONS, LITE2_DIM = 2543, 81, 1280
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")


def hardware() -> dict[str, Any]:
    """CPU model, cores, flags, torch threads, bf16 units, the load right now and the date."""
    from captioning.precision import cpu_bf16_units, cpu_flags

    info: dict[str, Any] = {"machine": platform.machine()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        lscpu = ""
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu"] = fields.get("Model name", platform.processor() or "unknown")
    info["cores"] = os.cpu_count()
    flags = cpu_flags()
    info["flags"] = [f for f in FLAGS if f in flags]
    info["avx512_bf16"] = "avx512_bf16" in flags
    info["amx_bf16"] = "amx_bf16" in flags
    info["bf16_units"] = cpu_bf16_units()
    info["torch_cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    info["torch"] = torch.__version__
    info["torch_threads"] = torch.get_num_threads()
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    info["load_avg"] = [round(x, 2) for x in os.getloadavg()]
    info["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return info


def load(name: str, out: Path = OUT) -> dict | None:
    """outputs/bench/NAME.json, if a benchmark has written it."""
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def load_avg() -> float:
    return round(os.getloadavg()[0], 2)


def measure(fn: Callable[[], Any], repeat: int = 3) -> dict[str, float]:
    """Median and min of wall and CPU seconds over `repeat` calls (after one warm-up call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - t0)
    return {
        "wall_s": statistics.median(wall),
        "wall_min_s": min(wall),
        "cpu_s": statistics.median(cpu),
        "cpu_min_s": min(cpu),
    }


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int = 3) -> dict[str, dict[str, float]]:
    """`measure` for several variants, alternating them so that load changes hit all alike."""
    for fn in fns.values():
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    return {
        k: {
            "wall_s": statistics.median(wall[k]),
            "wall_min_s": min(wall[k]),
            "cpu_s": statistics.median(cpu[k]),
            "cpu_min_s": min(cpu[k]),
        }
        for k in fns
    }


def flickr8k_test(encoder: str | None = None) -> dict[str, Any] | None:
    """Flickr8k's 1000 test images as the cache holds them: features (M, N, D), references.

    From CACHE (CAPTIONING_CACHE or outputs/cache): the converted dataset (flickr8k-*) for the
    test split's image ids and reference captions, and the feature cache directory whose image
    ids are exactly those (the val split also has 1000 images), of `encoder` when named (the
    cache directories start with the encoder's name). None when either is missing.
    """
    import numpy as np

    for d in sorted(glob.glob(str(CACHE / "flickr8k-*"))):
        try:
            import datasets

            test = datasets.load_from_disk(d)["test"]
            ids, refs = list(test["image_id"]), list(test["captions"])
            break
        except Exception:  # a conversion still in progress, or another layout
            continue
    else:
        return None
    for d in sorted(glob.glob(str(FEATURES / (f"{encoder}-*" if encoder else "*")))):
        ids_file = Path(d) / "image_ids.json"
        if not (ids_file.is_file() and (Path(d) / "features.npy").is_file()):
            continue
        if json.loads(ids_file.read_text()) == ids:
            feats = np.load(Path(d) / "features.npy", mmap_mode="r")
            return {
                "feats": torch.from_numpy(np.asarray(feats, dtype=np.float32)),
                "refs": refs,
                "image_ids": ids,
                "description": f"Flickr8k test split, features cached at {d}",
            }
    return None


def flickr8k_decoder(ckpt: str | None = None, seed: int = 0):
    """The decoder of checkpoint `ckpt` (or $BENCH_CKPT), else a random one of the flickr8k
    experiment's size. Returns (decoder in eval mode, vocab ids dict, description, vocab)."""
    ckpt = ckpt or os.environ.get("BENCH_CKPT") or None
    if ckpt:
        from captioning.inference import load_model

        cm = load_model(ckpt)
        v = cm.vocab
        ids = {
            "start_id": v.start_id,
            "end_id": v.end_id,
            "pad_id": v.pad_id,
            "banned": v.banned(),
            "max_len": v.max_len,
        }
        return cm.model.decoder.eval(), ids, f"trained checkpoint {ckpt}", v
    from captioning.decoders import build_decoder

    torch.manual_seed(seed)
    dec = build_decoder(
        "soft_attention",
        vocab_size=FLICKR8K_VOCAB,
        encoder_dim=LITE2_DIM,
        dropout=0.5,
        **FLICKR8K_DECODER,
    )
    ids = {"start_id": 1, "end_id": 2, "pad_id": 0, "banned": (0, 1, 3), "max_len": 20}
    desc = (
        "no checkpoint given (CKPT=...): a randomly initialised decoder of the flickr8k "
        "experiment's size (speed does not depend on the weights; captions are not real)"
    )
    return dec.eval(), ids, desc, None


def write_result(name: str, result: dict[str, Any], out: Path = OUT) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2, default=str))
    return path
