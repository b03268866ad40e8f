"""Lightning callbacks: console progress, `run_info.json` for sweep reports, W&B, weight EMA.

Nothing here imports wandb unless a WandbLogger is in use, so CSV-only runs never load it.
Letters: B images, N regions, L generated words.
"""

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar, WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn

from ..fsutil import atomic_write_text
from .wandb_log import wandb_run_info

log = logging.getLogger(__name__)


# -- console ---------------------------------------------------------------------------------
def progress_bar(every_n_steps: int = 50, tty: bool | None = None) -> ProgressBar:
    """Lightning's live bar on a terminal; without one (nohup, tee, CI) a plain line every
    `every_n_steps` training steps, since a bar redrawn in place is silent or garbled in a file."""
    if sys.stdout.isatty() if tty is None else tty:
        from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

        try:
            import rich  # noqa: F401
        except ImportError:
            return TQDMProgressBar()
        return RichProgressBar()
    return LineProgress(every_n_steps)


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class LineProgress(ProgressBar):
    """Training progress as plain lines: epoch, step, loss, speed and the epoch's time left."""

    def __init__(self, every_n_steps: int = 50):
        super().__init__()
        self.every_n_steps = max(1, int(every_n_steps))
        self._enabled = True
        self._start = 0.0
        # None: the next batch starts the clock. A run resumed mid-epoch gets no
        # on_train_epoch_start, so this must hold from the start as well.
        self._first_batch: int | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._first_batch = None  # a resumed epoch starts mid-way: rates count from here

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, i: int
    ) -> None:
        if self._first_batch is None:
            self._first_batch = i
            self._start = time.perf_counter()
            return
        total = self.total_train_batches
        done = i + 1
        last = isinstance(total, int) and done == total
        if not self._enabled or (done % self.every_n_steps and not last):
            return
        elapsed = time.perf_counter() - self._start
        rate = (i - self._first_batch) / elapsed if elapsed > 0 else 0.0
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        parts.append(f"step {done}/{total}" if isinstance(total, int) else f"step {done}")
        metrics = self.get_metrics(trainer, pl_module)
        parts += [f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)]
        if rate > 0:
            parts.append(f"{rate:.2f} steps/s")
            if isinstance(total, int) and not last:
                parts.append(f"epoch ends in {_clock((total - done) / rate)}")
        print("  ".join(parts), flush=True)


class ValidationSummary(Callback):
    """One line per validation: epoch, val BLEU-4 and CIDEr-D, loss, the best so far, time."""

    def __init__(self) -> None:
        self._fit_start: float | None = None
        self._epoch_start: float | None = None
        self._best: float | None = None
        self._best_epoch: int | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_scalar(v)}
        monitor = getattr(pl_module, "monitor", "val/bleu4")
        if monitor not in m:
            return
        now = time.perf_counter()
        epoch = trainer.current_epoch + 1
        value = m[monitor]
        if math.isfinite(value) and (self._best is None or value > self._best):
            self._best, self._best_epoch = value, epoch
        names = {"val/bleu4": "BLEU-4", "val/cider": "CIDEr-D", "val/loss": "loss"}
        parts = [f"epoch {epoch}/{trainer.max_epochs}: val"]
        parts += [f"{names[k]} {m[k]:.{d}f}" for k, d in (("val/bleu4", 4), ("val/cider", 3),
                                                       ("val/loss", 3)) if k in m]  # fmt: skip
        best = m.get(f"{monitor}_best", self._best)  # the module's, which survives a resume
        if best is not None and math.isfinite(best):
            where = f" (epoch {self._best_epoch})" if best == self._best else ""
            parts.append(f"best {names.get(monitor, monitor)} {best:.4f}{where}")
        if self._epoch_start is not None and self._fit_start is not None:
            took, total = now - self._epoch_start, now - self._fit_start
            parts.append(f"time {_clock(took)} (total {_clock(total)})")
        line = f"{parts[0]} {'  '.join(parts[1:])}"
        bar = trainer.progress_bar_callback  # its print keeps a live bar intact
        (bar.print if bar is not None else print)(line)
        sys.stdout.flush()


def _is_scalar(v: Any) -> bool:
    return isinstance(v, int | float) or (isinstance(v, torch.Tensor) and v.numel() == 1)


# -- weight averaging ------------------------------------------------------------------------
class WeightEMA(WeightAveraging):
    """Exponential moving average of the weights, updated after every optimizer step.

    Validation, the checkpoints' `state_dict` (what evaluate.py, caption.py and the app load)
    and the test after training all use the average; the raw weights travel in the checkpoint
    (`current_model_state`) so that a resumed run continues both. The decay warms up as
    min(decay, (1 + n) / (10 + n)) after n updates: with a fixed 0.999 a 3000-step run would keep
    5% of its first, barely trained, epoch in the average. Lightning's callback would also
    restore the raw weights when `trainer.test(ckpt_path=...)` loads a checkpoint after fitting,
    testing other weights than validation chose: outside fitting, the checkpoint's `state_dict`
    (the average) is what gets loaded.
    """

    def __init__(self, decay: float = 0.999, warmup: bool = True, **kwargs: Any):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in [0, 1); got {decay}")
        super().__init__(avg_fn=ema_update(decay, warmup), **kwargs)

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def ema_update(decay: float, warmup: bool = True):
    """avg_fn for `AveragedModel`: the average after its n-th update (n >= 1) with `current`."""

    def update(average: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        d = torch.clamp((1.0 + n) / (10.0 + n), max=decay) if warmup else decay  # stays on device
        return average + (current - average) * (1.0 - d)

    return update


# -- run_info.json ----------------------------------------------------------------------------
class RunInfo(Callback):
    """Writes `run_info.json`: parameter count, fit time, best epoch and score, status.

    Written when fitting starts (status "running"), then when it ends ("completed") or raises
    ("failed", with the error), so a job that died still says how far it got. The time is the
    fit's wall time, validation included. The best epoch is tracked with the checkpoint callback's
    own monitor and mode; both survive a resume (the callback's state is in the checkpoint).
    """

    def __init__(self, path: str | None = None):
        self.path = path  # None: <trainer.default_root_dir>/run_info.json
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self._prior_time_s = 0.0  # training time of earlier runs this one resumed from
        self._started: float | None = None

    def _monitor(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str | None, str]:
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and getattr(ckpt, "monitor", None):
            return ckpt.monitor, getattr(ckpt, "mode", "max")
        return getattr(pl_module, "monitor", None), "max"

    def train_time_s(self) -> float:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return self._prior_time_s + running

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()
        self._write(trainer, pl_module, "running")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor, mode = self._monitor(trainer, pl_module)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        if value is None:
            return
        value = float(value)
        if not math.isfinite(value):
            return
        # Strictly better, as ModelCheckpoint decides: a tie keeps the earlier epoch.
        best = self.best_score
        if best is None or (value > best if mode == "max" else value < best):
            self.best_score, self.best_epoch = value, trainer.current_epoch

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, pl_module, "completed")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        # Stopped by a signal (its checkpoint saved) or Ctrl-C: resumable, not broken.
        stopped = isinstance(exception, KeyboardInterrupt) or type(exception).__name__ == (
            "TrainingInterrupted"
        )
        status = "interrupted" if stopped else "failed"
        self._write(trainer, pl_module, status, error=f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:
        wandb = sys.modules.get("wandb")  # loaded only when a run logs to W&B
        run = getattr(wandb, "run", None) if wandb is not None else None
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s(),
            "wandb_run_id": getattr(run, "id", None),  # a resumed run logs on into that run
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_epoch = state_dict.get("best_epoch")
        self._prior_time_s = float(state_dict.get("train_time_s") or 0.0)

    def _write(
        self, trainer: L.Trainer, pl_module: L.LightningModule, status: str, error: str = ""
    ) -> None:
        if not trainer.is_global_zero:
            return
        monitor, mode = self._monitor(trainer, pl_module)
        params = list(pl_module.parameters())
        info = {
            "status": status,
            "error": error or None,
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
            "train_time_s": round(self.train_time_s(), 3),
            "monitor": monitor,
            "mode": mode,
            "best_epoch": self.best_epoch,
            "best_score": self.best_score,
            "epochs": trainer.current_epoch,
            "global_step": trainer.global_step,
            "wandb_run": wandb_run_info(trainer),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = Path(self.path or Path(trainer.default_root_dir) / "run_info.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        # a report reading it mid-run never sees half a file
        atomic_write_text(path, json.dumps(info, indent=2))
