"""What a checkpoint was trained on and how well it did, in words the page can show as they are.

    model_card(meta, ckpt_path)  ->  {"trained_on", "real_photos", "test_scores", "notice"}
    best_photo_checkpoint(root)  ->  the checkpoint `make app` serves when none is named

The data comes from the checkpoint (`data_info`, written by training); the test scores from the
run folder the checkpoint sits in (`test_metrics.json`, written by train.py after its test).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

DATA_NAMES = {"flickr8k": "Flickr8k", "flickr30k": "Flickr30k", "coco": "MS-COCO"}
SYNTHETIC_NOTICE = (
    "This model was trained on synthetic scenes of coloured shapes, so it describes every "
    "image, photos included, as shapes. To caption photos, train the Flickr8k model "
    "(`python train.py experiment=flickr8k`: about an hour on a CPU, with the Flickr8k "
    "images in ../shared/data/flickr8k or FLICKR8K_ROOT) and serve it with "
    "`make app CKPT=outputs/train/runs/<run>/checkpoints/last.ckpt`; a plain `make app` picks "
    "the best photo-trained checkpoint under outputs/ by itself."
)
# How checkpoints trained on photos are ranked: validation CIDEr-D, then BLEU-4 (every run
# logs both, whatever it selects on), then the newest.
RANK_METRICS = ("val/cider", "val/bleu4")


def trained_on(data: dict[str, Any]) -> str:
    """One line: the data set and how many training images it had."""
    name = data.get("name")
    n = (data.get("sizes") or {}).get("train")
    count = f"{n:,} " if isinstance(n, int) else ""
    if not name:
        return "not recorded in the checkpoint"
    if name == "synthetic":
        return f"synthetic scenes: {count}generated pictures of coloured shapes"
    if name == "hub":
        hub_id = (data.get("args") or {}).get("hub_id") or "a Hugging Face dataset"
        return f"{hub_id}: {count}captioned images"
    return f"{DATA_NAMES.get(name, name)}: {count}photos with human-written captions"


def run_dir(ckpt_path: Path) -> Path:
    """The training run a checkpoint belongs to (train.py saves into <run>/checkpoints/)."""
    return ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent


def read_test_scores(ckpt_path: str | Path) -> dict[str, Any] | None:
    """The test scores of the checkpoint's run, and whether this very checkpoint got them."""
    ckpt_path = Path(ckpt_path)
    run = run_dir(ckpt_path)
    try:
        saved = json.loads((run / "test_metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict):
        return None
    metrics = {
        k: v
        for k, v in (saved.get("metrics") or {}).items()
        if isinstance(v, int | float) and math.isfinite(v)
    }
    if not metrics:
        return None
    tested = Path(str(saved.get("checkpoint") or ""))
    this = tested.name != "" and (run / "checkpoints" / tested.name).resolve() == (
        ckpt_path.resolve()
    )
    return {
        "split": saved.get("split", "test"),
        "metrics": metrics,
        "decode": saved.get("decode") or {},
        "checkpoint": tested.name or None,  # the run's best checkpoint, which the test used
        "this_checkpoint": this,
    }


def model_card(meta: dict[str, Any], ckpt_path: str | Path) -> dict[str, Any]:
    """The page's and `/api/model`'s account of what the model knows."""
    data = meta.get("data") or {}
    name = data.get("name")
    return {
        "trained_on": trained_on(data),
        "real_photos": bool(name) and name != "synthetic",
        "test_scores": read_test_scores(ckpt_path),
        "notice": SYNTHETIC_NOTICE if name == "synthetic" else None,
    }


def _rank(info: dict[str, Any], mtime: float) -> tuple[float, ...]:
    metrics = info.get("metrics") or {}
    scores = []
    for key in RANK_METRICS:
        v = metrics.get(key)
        scores.append(float(v) if isinstance(v, int | float) and math.isfinite(v) else -math.inf)
    return (*scores, mtime)


def best_photo_checkpoint(root: str | Path = "outputs") -> Path | None:
    """The checkpoint under `root` trained on real photos that validated best, or None.

    Reads only each file's description (memory-mapped), not its weights; files that are not
    readable checkpoints of this project (half-written, foreign) are passed over.
    """
    root = Path(root)
    if not root.is_dir():
        return None
    best, best_rank = None, None
    for path in sorted(root.rglob("*.ckpt")):
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            info = ckpt["captioning"]
            name = info["data"].get("name")
            rank = _rank(info, path.stat().st_mtime)
        except Exception:  # torch raises many types on foreign or partial files
            continue
        if name and name != "synthetic" and (best_rank is None or rank > best_rank):
            best, best_rank = path, rank
    return best
