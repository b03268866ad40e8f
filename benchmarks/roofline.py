"""This machine's limits: fp32 and bf16 matmul peak and memory read bandwidth, per thread count.

    python benchmarks/roofline.py                 # 1 and 2 threads
    python benchmarks/roofline.py --threads 1,2,4

The peak is the best GFLOP/s of a square `torch.matmul` over sizes 256 to 4096 (a size is
skipped once one product takes over a second: on a CPU without bf16 units, torch's bf16
matmul is a slow reference loop, and 4096 would take minutes). Bandwidth: `sum` over a
512 MiB fp32 tensor, far larger than any cache. The decoding and training benchmarks divide
their GFLOP/s by these peaks (`benchmarks/report.py`), so a fraction of peak is always against
the same machine's own limit.

Writes outputs/bench/roofline.json.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from common import hardware, load, load_avg, write_result

SIZES = (256, 512, 1024, 2048, 4096)


def matmul_peak(dtype: torch.dtype, repeat: int = 3, max_seconds: float = 1.0) -> dict:
    """Best GFLOP/s of n x n @ n x n in `dtype` over SIZES, and the size that gave it."""
    best, best_cpu = {"gflops": 0.0, "n": None}, 0.0
    per_size = {}
    for n in SIZES:
        g = torch.Generator().manual_seed(n)
        a = torch.randn(n, n, generator=g).to(dtype)
        b = torch.randn(n, n, generator=g).to(dtype)
        t0 = time.perf_counter()
        torch.matmul(a, b)  # warm-up (and oneDNN's kernel selection)
        first = time.perf_counter() - t0
        times, cpu = [first], []
        for _ in range(repeat if first < max_seconds else 0):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.matmul(a, b)
            cpu.append(time.process_time() - c0)
            times.append(time.perf_counter() - t0)
        gflops = 2 * n**3 / min(times) / 1e9
        per_size[n] = round(gflops, 1)
        if gflops > best["gflops"]:
            best = {"gflops": round(gflops, 1), "n": n}
        if cpu:  # per CPU second of all threads together: per core, what a busy machine hides
            best_cpu = max(best_cpu, 2 * n**3 / max(min(cpu), 1e-9) / 1e9)
        if first > max_seconds:
            break
    return {**best, "gflops_cpu": round(best_cpu, 1), "per_size": per_size, "load_avg": load_avg()}


def read_bandwidth(mib: int = 512, repeat: int = 5) -> dict:
    """GB/s of `x.sum()` over `mib` MiB of fp32: what streaming weights from memory costs."""
    x = torch.ones(mib * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return {"gb_s": round(x.numel() * 4 / min(times) / 1e9, 1), "load_avg": load_avg()}


def peaks(threads: int) -> dict | None:
    """The peaks measured on this machine at `threads` threads (outputs/bench/roofline.json)."""
    r = load("roofline")
    if not r or r["hardware"]["cpu"] != hardware()["cpu"]:
        return None
    return r["threads"].get(str(threads))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    a = p.parse_args()
    result = {
        "benchmark": "roofline",
        "hardware": hardware(),
        "command": " ".join(["python benchmarks/roofline.py", *sys.argv[1:]]),
        "threads": {},
    }
    for t in [int(x) for x in a.threads.split(",")]:
        torch.set_num_threads(t)
        row = {
            "fp32": matmul_peak(torch.float32),
            "bf16": matmul_peak(torch.bfloat16),
            "read": read_bandwidth(),
        }
        result["threads"][str(t)] = row
        print(t, "threads", row, flush=True)
    print(write_result("roofline", result))


if __name__ == "__main__":
    main()
