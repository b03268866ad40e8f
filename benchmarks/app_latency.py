"""End-to-end latency of `POST /api/caption` for a 640x480 JPEG, beam 3, attention maps included.

    python benchmarks/app_latency.py --ckpt path/to/model.ckpt [--n 50] [--mode both]

`testclient` runs the app in this process (no network); `uvicorn` starts the real server in a
subprocess on 127.0.0.1 and sends each request over HTTP, as a browser would. Requests are
sequential: this is the latency one user sees, not throughput. Prints JSON, then one Markdown
table row per mode.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps

from captioning.app.service import APP_THREADS

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"


def photo_jpeg(size: tuple[int, int] = (640, 480)) -> tuple[bytes, str]:
    """A real photo resized to `size` when the shared data is there, else a synthetic scene."""
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if photos:
        with Image.open(photos[0]) as im:
            image = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), size)
        source = photos[0].name
    else:
        image = Image.new("RGB", size, (90, 140, 200))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size[1] * 2 // 3, size[0], size[1]), fill=(70, 120, 60))
        draw.ellipse((200, 120, 360, 280), fill=(220, 60, 40))
        source = "synthetic"
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue(), source


def percentiles(ms: list[float]) -> dict[str, float]:
    s = sorted(ms)
    p95 = s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]
    return {
        "p50_ms": round(statistics.median(s), 1),
        "p95_ms": round(p95, 1),
        "mean_ms": round(statistics.fmean(s), 1),
        "min_ms": round(s[0], 1),
    }


def run_requests(post, data: bytes, n: int, warmup: int, params: dict) -> dict:
    files = {"file": ("photo.jpg", data, "image/jpeg")}
    for _ in range(warmup):
        post("/api/caption", params=params, files=files).raise_for_status()
    wall, model = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = post("/api/caption", params=params, files=files)
        wall.append((time.perf_counter() - t0) * 1000)
        r.raise_for_status()
        body = r.json()
        assert body["beams"] and body["beams"][0]["attention"] is not None or not body["grid"]
        model.append(sum(body["timings_ms"].values()))
    out = percentiles(wall)
    out["server_p50_ms"] = round(statistics.median(model), 1)
    out["response_bytes"] = len(r.content)
    out["caption"] = body["caption"]
    return out


def bench_testclient(args: argparse.Namespace, data: bytes, params: dict) -> dict:
    from fastapi.testclient import TestClient

    from captioning.app import create_app

    with TestClient(create_app(args.ckpt, threads=args.threads)) as client:
        return run_requests(client.post, data, args.n, args.warmup, params)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_uvicorn(args: argparse.Namespace, data: bytes, params: dict) -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "captioning.app", "--ckpt", str(args.ckpt), "--port", str(port)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(base + "/api/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start within 300 s")
            time.sleep(0.3)
        with httpx.Client(base_url=base, timeout=60) as client:
            return run_requests(client.post, data, args.n, args.warmup, params)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument("--mode", choices=["testclient", "uvicorn", "both"], default="both")
    p.add_argument("--threads", type=int, default=APP_THREADS, help="torch threads (the app's)")
    p.add_argument("--overlays", action="store_true", help="also render PNG overlays per word")
    args = p.parse_args()

    from captioning.checkpoint import read_checkpoint

    meta = read_checkpoint(args.ckpt)["captioning"]
    data, source = photo_jpeg()
    params = {"beam_size": args.beam, "overlays": str(args.overlays).lower()}
    result = {
        "checkpoint": str(args.ckpt),
        "encoder": meta["encoder"]["name"],
        "decoder": meta["decoder"]["name"],
        "image": f"640x480 JPEG ({source}, {len(data)} bytes)",
        "beam_size": args.beam,
        "overlays": args.overlays,
        "n": args.n,
        "cpu": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch_threads": args.threads,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    modes = ["testclient", "uvicorn"] if args.mode == "both" else [args.mode]
    for mode in modes:
        bench = bench_testclient if mode == "testclient" else bench_uvicorn
        result[mode] = bench(args, data, params)
    print(json.dumps(result, indent=2))
    print("\n| transport | encoder | beam | n | p50 ms | p95 ms | server p50 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in modes:
        r = result[mode]
        print(
            f"| {mode} | {result['encoder']} | {args.beam} | {args.n} | {r['p50_ms']} | "
            f"{r['p95_ms']} | {r['server_p50_ms']} |"
        )


if __name__ == "__main__":
    main()
