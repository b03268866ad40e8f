"""Find checkpoints on disk: which one `caption.py` and the web app use when none is named.

The choice is the best checkpoint (by the run's own selection metric on the validation split)
of the newest *completed* run under `outputs/`: a run that was stopped after a few batches, is
still training, or was a `debug=fast` check, never wins because it was written last. Imports
neither Lightning nor Hydra.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CheckpointError

NO_CHECKPOINT_HINT = (
    "train one with `python train.py` (about 5 minutes on a CPU) or name one "
    "(caption.py ckpt_path=x.ckpt, make app CKPT=x.ckpt)"
)


@dataclass(frozen=True)
class FoundCheckpoint:
    """A checkpoint with what was known when it was chosen."""

    path: Path
    monitor: str | None = None  # the run's selection metric, e.g. val/bleu4
    score: float | None = None  # its value when this checkpoint was saved
    run_dir: Path | None = None
    completed: bool = False  # the run finished (test_metrics.json, or run_info.json "completed")

    def describe(self) -> str:
        """`outputs/.../epoch003.ckpt (val/bleu4 0.8860, best of the newest completed run)`."""
        parts = []
        if self.monitor and self.score is not None:
            parts.append(f"{self.monitor} {self.score:.4f}")
        if self.run_dir is not None:
            parts.append(
                "best of the newest completed run"
                if self.completed
                else "no completed run found: best of the newest run, which may still be training"
            )
        return f"{self.path} ({', '.join(parts)})" if parts else str(self.path)


def run_dir_of(ckpt: Path) -> Path:
    """The run directory a checkpoint belongs to (`<run>/checkpoints/x.ckpt` -> `<run>`)."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def completed_at(run_dir: Path) -> float | None:
    """When the run finished (modification time of its marker), or None if it did not.

    train.py writes `test_metrics.json` after testing the best checkpoint; with `test=false`
    the RunInfo callback's `run_info.json` says "completed" once fitting ended normally.
    """
    test = run_dir / "test_metrics.json"
    if test.is_file():
        return test.stat().st_mtime
    info = run_dir / "run_info.json"
    try:
        if json.loads(info.read_text()).get("status") == "completed":
            return info.stat().st_mtime
    except (OSError, ValueError, AttributeError):
        pass
    return None


def is_smoke_run(run_dir: Path) -> bool:
    """A `debug=fast` run (Lightning's fast_dev_run): one batch of each split, a check that the
    code runs, never a model to use, though it completes and may leave a last.ckpt."""
    import yaml  # PyYAML, which omegaconf requires

    try:
        config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        return bool(config["trainer"]["fast_dev_run"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return False


def read_selection(path: Path) -> tuple[str | None, float | None]:
    """(monitor, its value when saved) from a checkpoint's "captioning" block; (None, None) if
    the file cannot be read. Memory-mapped: only the small header is read, not the weights."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint (mmap needs one), truncated, foreign: unscored
        return None, None
    info = ckpt.get("captioning") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict):
        return None, None
    monitor = info.get("monitor")
    value = (info.get("metrics") or {}).get(monitor) if isinstance(monitor, str) else None
    try:
        score = float(value)
    except (TypeError, ValueError):
        score = None
    return monitor, score if score is not None and math.isfinite(score) else None


def best_in_run(run_dir: Path, ckpts: list[Path]) -> FoundCheckpoint:
    """The run's checkpoint with the highest stored selection score.

    Ties go to a numbered checkpoint over last.ckpt and then to the earlier one, as
    ModelCheckpoint keeps the earlier epoch on a tie; unscored files rank last (newest first).
    """
    scored = []
    for p in ckpts:
        monitor, score = read_selection(p)
        scored.append((p, monitor, score))

    def rank(item: tuple[Path, str | None, float | None]) -> tuple:
        p, _, score = item
        return (score is not None, score or 0.0, p.name != "last.ckpt", -p.stat().st_mtime)

    def newest(item: tuple[Path, str | None, float | None]) -> float:
        return item[0].stat().st_mtime

    if any(s is not None for _, _, s in scored):
        path, monitor, score = max(scored, key=rank)
    else:
        path, monitor, score = max(scored, key=newest)
    return FoundCheckpoint(path, monitor, score, run_dir, completed_at(run_dir) is not None)


def find_checkpoint(root: str | Path = "outputs") -> FoundCheckpoint | None:
    """The best checkpoint of the newest completed run under `root`; else, when no run has
    completed, the best of the run with the newest checkpoint; None without any `*.ckpt`."""
    root = Path(root)
    if not root.is_dir():
        return None
    runs: dict[Path, list[Path]] = {}
    for p in root.rglob("*.ckpt"):
        if p.is_file():
            runs.setdefault(run_dir_of(p), []).append(p)
    if not runs:
        return None
    real = {d: ckpts for d, ckpts in runs.items() if not is_smoke_run(d)}
    runs = real or runs  # only debug=fast runs: better one of them than nothing
    done = {d: t for d in runs if (t := completed_at(d)) is not None}
    if done:
        run = max(done, key=done.__getitem__)
    else:
        run = max(runs, key=lambda d: max(p.stat().st_mtime for p in runs[d]))
    return best_in_run(run, runs[run])


def newest_checkpoint(root: str | Path = "outputs") -> Path | None:
    """The most recently written `*.ckpt` under `root`, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    ckpts = [p for p in root.rglob("*.ckpt") if p.is_file()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def locate_checkpoint(path: str | Path | None, root: str | Path = "outputs") -> FoundCheckpoint:
    """`path` if given (it must exist), else `find_checkpoint(root)`; raises CheckpointError."""
    if path not in (None, ""):
        p = Path(str(path)).expanduser()
        if not p.is_file():
            raise CheckpointError(f"checkpoint not found: {p}")
        monitor, score = read_selection(p)
        return FoundCheckpoint(p, monitor, score)
    found = find_checkpoint(root)
    if found is None:
        raise CheckpointError(
            f"no checkpoint given and no *.ckpt under {root}/; {NO_CHECKPOINT_HINT}"
        )
    return found


def resolve_checkpoint(path: str | Path | None, root: str | Path = "outputs") -> Path:
    """The path of `locate_checkpoint(path, root)`."""
    return locate_checkpoint(path, root).path


def describe_data(data: dict[str, Any] | None) -> str | None:
    """One line for a model that only knows the built-in synthetic scenes, else None."""
    if not isinstance(data, dict) or data.get("name") != "synthetic":
        return None
    words = data.get("vocab_size")
    vocab = f"a {words}-word vocabulary" if isinstance(words, int) else "a tiny vocabulary"
    return (
        f"note: this model was trained on the built-in synthetic scenes (coloured shapes, {vocab}); "
        "it describes any image as such a scene. For photos, train on real data "
        "(python train.py experiment=flickr8k) or name another checkpoint with ckpt_path=..."
    )
