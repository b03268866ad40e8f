"""The checkpoint format, owned here: writing, reading, migrating, and finding checkpoints.

A checkpoint is what Lightning saves plus a "captioning" block that describes the model (encoder
and decoder configs, vocabulary, preprocessing), so `inference.load_model` rebuilds it from the
file alone. `checkpoint_block` writes that block, `read_checkpoint` reads and checks it (migrating
older formats), `model_state` takes the Captioner's weights out of the module's state dict. When
none is named, `caption.py` and the web app use the best checkpoint (by the run's own selection
metric on the validation split) of the newest *completed* run under `outputs/`: a run that was
stopped after a few batches, is still training, or was a `debug=fast`
check, never wins because it was written last.
Imports neither Lightning nor Hydra.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import CheckpointDirError, CheckpointError
from .vocab import SPECIALS

FORMAT = 1  # bump when the "captioning" block changes incompatibly; add its step to `migrate`
# How a torch.save file starts: a zip archive (the default since PyTorch 1.6), or a pickle.
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
# What `inference.load_model` needs from a checkpoint's "captioning" block.
_REQUIRED = ("encoder", "decoder", "vocab", "preprocess")
# What a checkpoint holds besides the weights when it can resume training.
TRAINING_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
MODEL_PREFIX = "model."  # the Captioner's weights in the LightningModule's state dict


# -- writing ---------------------------------------------------------------------------------
def checkpoint_block(
    *,
    encoder: dict[str, Any],
    decoder: dict[str, Any],
    vocab: dict[str, Any],
    preprocess: dict[str, Any],
    data: dict[str, Any] | None,
    metrics: dict[str, float],
    monitor: str,
    monitor_best: float,
) -> dict[str, Any]:
    """The "captioning" block: everything needed to rebuild and judge the model, plain values."""
    return {
        "format": FORMAT,
        "encoder": dict(encoder),
        "decoder": dict(decoder),
        "vocab": vocab,
        "preprocess": preprocess,
        "data": dict(data or {}),
        "metrics": metrics,
        "monitor": monitor,
        "monitor_best": float(monitor_best),  # exact, for `{monitor}_best` after a resume
        "code_version": code_version(),
    }


def code_version() -> str:
    """Package version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def save_atomic(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write `.<name>.tmp` next to `path`, fsync it, then rename it over the old file: a kill or
    a full disk mid-write leaves the previous checkpoint intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp.parent.is_dir():
            tmp.unlink(missing_ok=True)
        raise CheckpointDirError(
            f"cannot write checkpoint {path}: {e.strerror or e}; the "
            "previous checkpoint there, if any, is intact"
        ) from None


# -- reading ---------------------------------------------------------------------------------
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint of this project, or raise `CheckpointError` saying why it is not one.

    `weights_only=True` unpickles only plain containers, numbers, strings and tensors, so a file
    holding any other object (a pickled class whose `__reduce__` would run code, say) is refused
    before anything in it runs. Older formats come back migrated to the current one.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path} is empty, not a checkpoint")
    with path.open("rb") as f:
        head = f.read(4)
    if not head.startswith(_TORCH_MAGIC):
        raise CheckpointError(
            f"{path} is not a readable checkpoint: not a file written by torch.save (train.py "
            "writes <run dir>/checkpoints/*.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types on foreign or corrupt files
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        # An IndexError or KeyError from deep inside the unpickler says nothing to a user.
        why = f": {first[:300]}" if first and not isinstance(e, LookupError | TypeError) else ""
        raise CheckpointError(
            f"{path} is not a readable checkpoint (truncated, corrupt, or it holds objects that "
            f"are not plain tensors and values){why}"
        ) from None
    info = ckpt.get("captioning") if isinstance(ckpt, dict) else None
    if not isinstance(info, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} is not a checkpoint of this project (no 'captioning' block and 'state_dict'; "
            "a checkpoint written by train.py has both)"
        )
    fmt = info.get("format")
    if type(fmt) is not int or fmt < 1:
        raise CheckpointError(f"{path} has an invalid checkpoint format {fmt!r}")
    if fmt > FORMAT:
        raise CheckpointError(
            f"{path} has checkpoint format {fmt}, newer than this version supports "
            f"({FORMAT}); upgrade the captioning package"
        )
    ckpt["captioning"] = info = migrate(info)
    missing = [k for k in _REQUIRED if not isinstance(info.get(k), dict)]
    itos = info.get("vocab", {}).get("itos") if isinstance(info.get("vocab"), dict) else None
    bad_vocab = not isinstance(itos, list) or tuple(itos[: len(SPECIALS)]) != SPECIALS
    if missing or bad_vocab or not isinstance(info["vocab"].get("max_len"), int):
        what = ", ".join(missing) or "vocab"
        raise CheckpointError(f"{path}: the 'captioning' block is incomplete (bad or no {what})")
    if not all(isinstance(v, torch.Tensor) for v in ckpt["state_dict"].values()):
        raise CheckpointError(f"{path}: 'state_dict' holds values that are not tensors")
    return ckpt


def migrate(info: dict[str, Any]) -> dict[str, Any]:
    """A "captioning" block of any supported format, as the current format.

    Format 1 is the current one. A change to the block bumps `FORMAT` and adds here the step
    from the previous format, so every checkpoint written since format 1 keeps loading.
    """
    return info


def model_state(state_dict: dict[str, Any]) -> dict[str, Any]:
    """The Captioner's weights from a checkpoint's state dict (the module's "model." entries)."""
    return {
        k.removeprefix(MODEL_PREFIX): v for k, v in state_dict.items() if k.startswith(MODEL_PREFIX)
    }


# -- pre-flight checks -----------------------------------------------------------------------
def checkpoint_bytes(module: torch.nn.Module) -> int:
    """About the size of a training checkpoint: weights, plus two Adam moments per trainable."""
    total = 0
    for p in module.parameters():
        total += p.numel() * p.element_size() * (3 if p.requires_grad else 1)
    return total + sum(b.numel() * b.element_size() for b in module.buffers())


def check_checkpoint_dir(path: str | Path, need_bytes: int = 0) -> None:
    """Fail now, not after the first epoch, when checkpoints cannot be written to `path`."""
    path = Path(path)
    probe = path / f".write-test-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise CheckpointDirError(
            f"cannot write checkpoints to {path}: {e.strerror or e}. Choose a writable "
            "hydra.run.dir (or callbacks.model_checkpoint.dirpath)"
        ) from None
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise CheckpointDirError(
            f"only {free / 2**20:.0f} MiB free under {path}, and this run's checkpoints need "
            f"about {need_bytes / 2**20:.0f} MiB; free some space or choose another directory"
        )


def check_resumable(ckpt: dict[str, Any], path: str | Path, module: Any) -> None:
    """A checkpoint (from `read_checkpoint`) that can resume training `module`, or a clear error.

    Lightning would otherwise fail with a traceback about missing keys or tensor shapes, or,
    with a same-sized vocabulary of other words, silently train on the wrong ids.
    """
    missing = [k for k in TRAINING_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} holds weights only (no {', '.join(missing)}), so it cannot resume training"
        )
    info = ckpt["captioning"]
    ours, theirs = module.state_dict(), ckpt["state_dict"]
    same = set(ours) == set(theirs) and all(
        isinstance(theirs[k], torch.Tensor) and theirs[k].shape == v.shape for k, v in ours.items()
    )
    if not same:
        enc, dec = info.get("encoder", {}).get("name"), info.get("decoder", {}).get("name")
        raise CheckpointError(
            f"{path} holds another model (encoder {enc}, decoder {dec}, "
            f"{len(info['vocab']['itos'])} words) than this config builds (encoder "
            f"{module.hparams.encoder.get('name')}, decoder {module.hparams.decoder.get('name')}, "
            f"{len(module.vocab)} words); resume with the config it was trained with"
        )
    if list(info["vocab"]["itos"]) != list(module.vocab.itos):
        raise CheckpointError(
            f"{path} was trained with another vocabulary than this data builds; "
            "resume with the data config it was trained with"
        )


# -- finding ---------------------------------------------------------------------------------
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
