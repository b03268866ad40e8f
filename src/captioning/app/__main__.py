"""`python -m captioning.app [--ckpt x.ckpt] [--port 8000]`: serve the page and the JSON API.

Without --ckpt it serves the best checkpoint under outputs/ trained on photos (highest
validation CIDEr-D), else the newest one; with --train-if-missing (what `make app` passes) and
none there, it trains the built-in model first with `python train.py`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from ..checkpoint import newest_checkpoint, resolve_checkpoint
from ..errors import CheckpointError, UserError
from ..inference import resolve_device
from .model_card import best_photo_checkpoint
from .service import APP_THREADS, BATCH_WAIT_MS, MAX_BATCH, Limits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m captioning.app",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--ckpt",
        default=os.environ.get("CKPT") or None,
        help="checkpoint to serve (default: the best one under --outputs trained on photos, "
        "else the newest *.ckpt there)",
    )
    p.add_argument("--outputs", default="outputs", help="where to look for checkpoints")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--threads", type=int, default=APP_THREADS, help="torch CPU threads (default: %(default)s)"
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0)
    p.add_argument("--max-beam", type=int, default=10)
    p.add_argument(
        "--batch-wait-ms",
        type=float,
        default=BATCH_WAIT_MS,
        help="gather concurrent requests this long and beam-search them together; 0: one at a "
        "time (default: %(default)s)",
    )
    p.add_argument(
        "--max-batch", type=int, default=MAX_BATCH, help="images per batch (default: %(default)s)"
    )
    p.add_argument(
        "--train-if-missing",
        action="store_true",
        help="no checkpoint found: train the built-in model first (~5 min on a CPU)",
    )
    p.add_argument(
        "--train-overrides",
        nargs="*",
        default=[],
        help="overrides for that training run, e.g. experiment=flickr8k",
    )
    return p.parse_args(argv)


def find_or_train(args: argparse.Namespace) -> Path:
    if not args.ckpt:
        photos = best_photo_checkpoint(args.outputs)
        if photos is not None:
            print(
                f"serving {photos}: the best checkpoint under {args.outputs}/ trained on photos "
                "(by validation CIDEr-D); CKPT=... or --ckpt serves another",
                flush=True,
            )
            return photos
    if args.ckpt or newest_checkpoint(args.outputs) is not None or not args.train_if_missing:
        return resolve_checkpoint(args.ckpt, args.outputs)
    if not Path("train.py").is_file():
        raise UserError(
            f"no checkpoint under {args.outputs}/ and no train.py here to train one: run from "
            "the repository root, or pass --ckpt path/to/model.ckpt"
        )
    print(
        f"No checkpoint under {args.outputs}/: training the built-in model first with "
        "`python train.py` (about 5 minutes on a CPU; the app starts when it is done).",
        flush=True,
    )
    run_dir = Path(args.outputs) / "train" / "runs" / time.strftime("%Y-%m-%d_%H-%M-%S")
    rc = subprocess.call(
        [sys.executable, "train.py", f"hydra.run.dir={run_dir}", *args.train_overrides]
    )
    if rc != 0:
        raise UserError(f"training failed (exit status {rc}); see the messages above")
    return resolve_checkpoint(None, args.outputs)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        import uvicorn

        from .server import create_app

        ckpt = find_or_train(args)
        device = resolve_device(args.device)
        limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_beam=args.max_beam)
        print(f"loading {ckpt} on {device}", flush=True)
        app = create_app(
            ckpt,
            device=device,
            threads=args.threads,
            limits=limits,
            batch_wait_ms=args.batch_wait_ms,
            max_batch=args.max_batch,
        )
    except (UserError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"serving on http://{args.host}:{args.port}/  (API docs: /docs; Ctrl-C stops)", flush=True
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
