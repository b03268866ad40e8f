"""End-to-end latency of `POST /api/caption` for a 640x480 JPEG, beam 3, attention maps included.

    python benchmarks/app_latency.py --ckpt path/to/model.ckpt [--n 50] [--mode both]
    python benchmarks/app_latency.py --ckpt path/to/model.ckpt --mode concurrency \
        [--clients 1 4 16] [--batch-wait-ms 0 5] [--seconds 30] [--rounds 2]

`testclient` runs the app in this process (no network); `uvicorn` starts the real server in a
subprocess on 127.0.0.1 and sends each request over HTTP, as a browser would. Both send requests
one after another: the latency one user sees. `concurrency` starts one server per
--batch-wait-ms value (0: no batching) and, for each client count, keeps that many clients
busy for --seconds against each server in turn (the order alternates between rounds, so a
machine whose load drifts favours neither), each client sending its own photo: requests/s,
latency percentiles, mean batch size, and the load average when each measurement began.
Prints JSON, then a Markdown table; `concurrency` also writes outputs/bench/app_latency.json
(the table of docs/performance.md: `python benchmarks/report.py`).
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
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from PIL import Image, ImageDraw, ImageOps

from captioning.app.service import APP_THREADS

sys.path.insert(0, str(Path(__file__).parent))
from common import hardware, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT.parent / "shared" / "data" / "coco-mini" / "val2017"


def photo_jpeg(size: tuple[int, int] = (640, 480), index: int = 0) -> tuple[bytes, str]:
    """A real photo resized to `size` when the shared data is there, else a synthetic scene."""
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if photos:
        path = photos[index % len(photos)]
        with Image.open(path) as im:
            image = ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), size)
        source = path.name
    else:
        image = Image.new("RGB", size, (90, 140, 200 - 7 * (index % 16)))
        draw = ImageDraw.Draw(image)
        draw.rectangle((0, size[1] * 2 // 3, size[0], size[1]), fill=(70, 120, 60))
        x = 120 + 20 * (index % 16)
        draw.ellipse((x, 120, x + 160, 280), fill=(220, 60, 40))
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


@contextmanager
def uvicorn_server(args: argparse.Namespace, *extra: str):
    """`python -m captioning.app` in a subprocess on a free port; yields its base URL."""
    port = free_port()
    cmd = [sys.executable, "-m", "captioning.app", "--ckpt", str(args.ckpt), "--port", str(port)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    cmd += list(extra)
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
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def bench_uvicorn(args: argparse.Namespace, data: bytes, params: dict) -> dict:
    with uvicorn_server(args) as base, httpx.Client(base_url=base, timeout=60) as client:
        return run_requests(client.post, data, args.n, args.warmup, params)


def closed_loop(base: str, photos: list[bytes], clients: int, seconds: float, params: dict) -> dict:
    """`clients` threads, each posting its own photo again as soon as its answer comes."""
    records: list[list[tuple[float, int]]] = [[] for _ in range(clients)]
    errors: list[str] = []
    barrier = threading.Barrier(clients + 1)

    def client(i: int) -> None:
        files = {"file": (f"{i}.jpg", photos[i % len(photos)], "image/jpeg")}
        with httpx.Client(base_url=base, timeout=300) as c:
            c.post("/api/caption", params=params, files=files).raise_for_status()  # warm
            barrier.wait()
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = c.post("/api/caption", params=params, files=files)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                records[i].append(((time.perf_counter() - t0) * 1000, r.json()["batch_size"]))

    stop = float("inf")
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    load = os.getloadavg()[0]
    barrier.wait()
    start = time.perf_counter()
    stop = start + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start  # until the last request that began in time ends
    done = [r for rs in records for r in rs]
    if errors or not done:
        raise RuntimeError(f"{len(errors)} failed requests, e.g. {errors[:1]}")
    out = percentiles([ms for ms, _ in done])
    out.update(
        requests=len(done),
        seconds=round(elapsed, 1),
        requests_per_s=round(len(done) / elapsed, 2),
        mean_batch=round(statistics.fmean(b for _, b in done), 2),
        load_avg_1m=round(load, 2),
    )
    return out


def bench_concurrency(args: argparse.Namespace, params: dict) -> dict:
    photos = [photo_jpeg(index=i)[0] for i in range(max(args.clients))]
    results: dict[float, dict[int, list[dict]]] = {
        w: {c: [] for c in args.clients} for w in args.batch_wait_ms
    }
    with ExitStack() as stack:
        bases = {
            w: stack.enter_context(
                uvicorn_server(args, "--batch-wait-ms", str(w), "--max-batch", str(args.max_batch))
            )
            for w in args.batch_wait_ms
        }
        for r in range(args.rounds):
            for c in args.clients:
                order = args.batch_wait_ms if r % 2 == 0 else args.batch_wait_ms[::-1]
                for w in order:
                    res = closed_loop(bases[w], photos, c, args.seconds, params)
                    results[w][c].append(res)
                    print(
                        f"round {r} wait {w} ms, {c} clients: {json.dumps(res)}",
                        file=sys.stderr,
                        flush=True,
                    )
    return {
        f"wait_{w}ms": {str(c): merge(runs) for c, runs in by_c.items()}
        for w, by_c in results.items()
    }


def merge(runs: list[dict]) -> dict:
    """Several measurements of one setting: summed counts, the percentiles of each, the loads."""
    n, secs = sum(r["requests"] for r in runs), sum(r["seconds"] for r in runs)
    return {
        "requests": n,
        "requests_per_s": round(n / secs, 2),
        "p50_ms": [r["p50_ms"] for r in runs],
        "p95_ms": [r["p95_ms"] for r in runs],
        "mean_batch": [r["mean_batch"] for r in runs],
        "load_avg_1m": [r["load_avg_1m"] for r in runs],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--beam", type=int, default=3)
    p.add_argument(
        "--mode", choices=["testclient", "uvicorn", "both", "concurrency"], default="both"
    )
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch-wait-ms", type=float, nargs="+", default=[0.0, 50.0])
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--seconds", type=float, default=30.0, help="per measurement")
    p.add_argument("--rounds", type=int, default=2)
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
    if args.mode == "concurrency":
        where = "coco-mini val2017" if source != "synthetic" else "synthetic scenes"
        result["photos"] = f"{max(args.clients)} photos, 640x480 JPEG ({where})"
        result["hardware"] = hardware()
        result["command"] = " ".join(["python benchmarks/app_latency.py", *sys.argv[1:]])
        result["concurrency"] = bench_concurrency(args, params)
        print(json.dumps(result, indent=2))
        print(write_result("app_latency", result), file=sys.stderr)
        print("\n| clients | batching | requests/s | p50 ms | p95 ms | mean batch | load avg 1m |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for c in args.clients:
            for w in args.batch_wait_ms:
                r = result["concurrency"][f"wait_{w}ms"][str(c)]
                label = f"on ({w:g} ms)" if w > 0 else "off"
                cells = [
                    ", ".join(str(x) for x in r[k])
                    for k in ("p50_ms", "p95_ms", "mean_batch", "load_avg_1m")
                ]
                print(f"| {c} | {label} | {r['requests_per_s']} | " + " | ".join(cells) + " |")
        return
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
