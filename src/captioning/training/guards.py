"""Stops that leave a usable checkpoint: SIGTERM / SIGINT, and NaN/Inf losses or gradients."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from ..errors import ConfigError, UserError

log = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """A NaN or Inf loss, gradient or validation score under `nan_policy: stop`."""


class TrainingInterrupted(UserError):
    """SIGTERM / SIGINT arrived; a checkpoint was written. The exit status is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# -- signals --------------------------------------------------------------------------------
def last_checkpoint_path(trainer: L.Trainer) -> Path:
    """Where `last.ckpt` goes: the ModelCheckpoint's folder, else <default_root_dir>/checkpoints."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}{cb.FILE_EXTENSION}"
    return Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"


class GracefulInterrupt(Callback):
    """SIGTERM / SIGINT: finish the current step, save `last.ckpt`, raise `TrainingInterrupted`.

    Mid-epoch the checkpoint is written after the step and marked mid-epoch (`ResumeState`
    resumes it exactly). On the epoch's last batch, or during validation, the epoch is finished
    first (validation, then the usual end-of-epoch `last.ckpt`), because Lightning resumes a
    checkpoint taken after the last batch without running that epoch's validation. The handler
    only sets a flag, so a step is never cut in half; a second Ctrl+C stops at once. The process
    exits with 128 + the signal's number (`cli.run_safely`), as if killed, so schedulers see that
    the job did not finish.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._saved_step = -1

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "received %s: finishing this step, then saving a checkpoint",
            signal.Signals(signum).name,
        )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its own SIGTERM handler, which only stops after the batch
        # (exit status 0, no checkpoint); ours replaces it for the length of the fit.
        if threading.current_thread() is not threading.main_thread():
            return
        if trainer.world_size > 1:
            # Every rank would have to save at the same batch; Lightning's own SIGTERM handling
            # agrees on that across ranks (it stops after the batch, without a checkpoint).
            log.info("GracefulInterrupt is off with %d processes", trainer.world_size)
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _restore_handlers(self) -> None:
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) == self._handle:  # Lightning may already have reset it
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        self._saved_step = trainer.global_step

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.received is not None and batch_idx + 1 < trainer.num_training_batches:
            self._save_and_stop(
                trainer,
                f"in epoch {trainer.current_epoch + 1} after batch "  # from 1, as the log counts
                f"{batch_idx + 1} of {trainer.num_training_batches}",
            )

    # The epoch's end: only once the checkpoint callbacks, which run after us in
    # on_train_epoch_end, have saved it; that is, at the next epoch's start or the training's end.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None:
            self._save_and_stop(trainer, f"at the end of epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self.received is not None:  # trained to the end; resuming runs what follows
            self._save_and_stop(trainer, f"at the end of training (epoch {trainer.current_epoch})")

    def _save_and_stop(self, trainer: L.Trainer, where: str) -> None:
        path = last_checkpoint_path(trainer)
        if self._saved_step != trainer.global_step:  # the end-of-epoch one may be there already
            trainer.save_checkpoint(path, weights_only=False)
        name = signal.Signals(self.received).name
        raise TrainingInterrupted(
            f"{name}: stopped {where}; saved {path}. {resume_advice(trainer.default_root_dir)}",
            self.received,
        )


def resume_advice(run_dir: str | Path) -> str:
    """How to continue this run: the run's folder, or in a multirun the sweep's."""
    sweep_dir = None
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            sweep_dir = HydraConfig.get().sweep.dir
    except Exception:  # outside Hydra (tests, notebooks): a single run
        sweep_dir = None
    if sweep_dir:
        return (
            "Resume the sweep with the same command plus resume=auto and "
            f"hydra.sweep.dir={sweep_dir}: each job continues from its own last.ckpt"
        )
    return (
        "Resume with the same command plus resume=auto (or ckpt_path=last) and "
        f"hydra.run.dir={Path(run_dir)}"
    )


# -- numerical faults -----------------------------------------------------------------------
class NonFiniteGuard(Callback):
    """A NaN/Inf loss or gradient: `stop` raises before it reaches the weights; `skip` drops the
    batch's update (and stops when every batch of an epoch was dropped). A non-finite validation
    score stops the run under `stop`; under either policy it never becomes the best checkpoint
    (`FiniteModelCheckpoint`)."""

    def __init__(self, policy: str = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ConfigError(f"nan_policy must be stop or skip; got {policy!r}")
        self.policy = policy
        self.skipped = 0
        self._skipped_this_epoch = 0
        self._bad: str | None = None

    def _where(self, trainer: L.Trainer) -> str:
        batch = trainer.fit_loop.epoch_loop.batch_idx
        return f"epoch {trainer.current_epoch}, batch {batch} (global step {trainer.global_step})"

    def _fail(self, trainer: L.Trainer, what: str) -> None:
        raise NonFiniteError(
            f"{what} at {self._where(trainer)}; stopped before it reached the weights. The last "
            f"checkpoint holds the state before it ({last_checkpoint_path(trainer)}). Lower the "
            "learning rates, or set nan_policy=skip to skip such batches"
        )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._skipped_this_epoch = 0

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor
    ) -> None:
        self._bad = None
        if not bool(torch.isfinite(loss.detach()).all()):
            self._bad = f"the training loss is {loss.detach().float().sum().item()}"
            if self.policy == "stop":
                self._fail(trainer, self._bad)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # With a GradScaler (16-mixed), inf gradients are routine: the scaler skips those steps.
        if self._bad is None and getattr(trainer.precision_plugin, "scaler", None) is None:
            grads = [
                p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None
            ]
            if grads and not bool(torch.isfinite(_total_norm(grads))):
                self._bad = "the gradients are not finite"
        if self._bad is None:
            return
        if self.policy == "stop":
            self._fail(trainer, self._bad)
        optimizer.zero_grad(set_to_none=True)  # AdamW leaves a parameter without a gradient alone
        self.skipped += 1
        self._skipped_this_epoch += 1
        log.warning(
            "%s at %s: batch skipped (%d so far)", self._bad, self._where(trainer), self.skipped
        )
        self._bad = None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._skipped_this_epoch and self._skipped_this_epoch >= trainer.num_training_batches:
            raise NonFiniteError(
                f"every batch of epoch {trainer.current_epoch} had a non-finite "
                "loss or gradient; nothing is being learned"
            )

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        monitor = getattr(pl_module, "monitor", None)
        value = trainer.callback_metrics.get(monitor) if monitor else None
        if trainer.sanity_checking or value is None or bool(torch.isfinite(value).all()):
            return
        if self.policy == "stop":  # raised before the checkpoint callbacks run: nothing saved
            raise NonFiniteError(
                f"{monitor} is {float(value)} after epoch "
                f"{trainer.current_epoch}; the model has diverged"
            )
        log.warning(
            "%s is %s after epoch %d: it will not be the best checkpoint",
            monitor,
            float(value),
            trainer.current_epoch,
        )


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
