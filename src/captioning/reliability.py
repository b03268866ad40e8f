"""Training that survives interruptions and bad numbers.

- `ResumeState`: every checkpoint carries the global RNG states and the position in the shuffled
  training data, so a resumed run continues exactly as if it had never stopped.
- `GracefulInterrupt`: SIGTERM / SIGINT finish the current step, write `last.ckpt`, then exit.
- `NonFiniteGuard`: a NaN/Inf loss or gradient stops the run (or skips the batch).
- `FiniteModelCheckpoint`: a non-finite score is never the best checkpoint; last.ckpt follows
  every epoch; a run directory that was moved or copied resumes like one that was not.
- `AtomicCheckpointIO`: a checkpoint file is the old one or the new one, never half written.
- `check_checkpoint_dir`, `check_resumable`: fail before the first epoch, not after hours.

How a resume repeats the uninterrupted run exactly (one device; tests/test_reliability.py kills
real runs and compares metrics and weights bit for bit). Lightning restores the weights,
optimiser, scheduler, callbacks (early stopping, best checkpoints) and loop counters, and after a
mid-epoch checkpoint it goes on at the next batch index. It does not restore:
- the data order: it builds a new DataLoader, whose shuffling generator is seeded afresh, so the
  resumed epoch would replay the first epoch's order. `ResumeState` saves the generator's state:
  after an end-of-epoch checkpoint the next epoch draws the order it would have drawn; after a
  mid-epoch one the interrupted epoch draws its order again and skips, at the sampler (no image
  decoded for nothing), the batches already trained. So a mid-epoch resume continues exactly; it
  does not restart the epoch.
- the global RNGs (dropout), nor `trainer.should_stop` (early stopping that fired just before
  the checkpoint): saved and restored by `ResumeState` (the stop only while early stopping is
  still configured: `callbacks.early_stopping=null` continues a finished run).
- the CSV log: Lightning's CSVLogger deletes metrics.csv when a run starts; `continue_csv_logs`
  keeps the rows logged before the checkpoint.
- last.ckpt after epochs that do not improve the score (Lightning 2.6 skips it then): see
  `FiniteModelCheckpoint`.
- the best score so far and last.ckpt's name when the run directory has moved (copied from
  scratch, renamed): see `FiniteModelCheckpoint.load_state_dict`.
Not covered: several processes (DDP; Lightning swaps in a DistributedSampler, and
`GracefulInterrupt` stands aside), and randomness inside DataLoader workers after a resume (each
new iterator seeds its workers afresh; our transforms draw no random numbers).
"""

from __future__ import annotations

import collections
import csv
import itertools
import logging
import os
import random
import shutil
import signal
import threading
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import BatchSampler, DataLoader, Sampler

from .errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)

RESUME_STATE_VERSION = 1


class CheckpointDirError(UserError):
    """Checkpoints cannot be written where the run would write them."""


class NonFiniteError(UserError):
    """A NaN or Inf loss, gradient or validation score under `nan_policy: stop`."""


class TrainingInterrupted(UserError):
    """SIGTERM / SIGINT arrived; a checkpoint was written. The exit status is 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# -- RNG states as plain values (a checkpoint loads with torch.load(weights_only=True)) -------
def rng_state() -> dict[str, Any]:
    """The global RNG states of torch (CPU and CUDA), numpy and `random`, as plain values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": keys.tolist(),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "random": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        (
            n["name"],
            np.asarray(n["keys"], dtype=np.uint32),
            n["pos"],
            n["has_gauss"],
            n["cached_gaussian"],
        )
    )
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss_next"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# -- exact resume ---------------------------------------------------------------------------
class _ResumableSampler(Sampler[int]):
    """Wraps a DataLoader's sampler: remembers the generator state each epoch starts from, and
    once, after a mid-epoch resume, restarts from such a state and skips the batches done."""

    def __init__(self, inner: Any, batch_size: int, generator: torch.Generator | None):
        self.inner = inner
        self.batch_size = batch_size
        self.generator = generator
        self.epoch_start: torch.Tensor | None = None
        self._resume: tuple[torch.Tensor | None, int] | None = None

    def resume(self, epoch_start: torch.Tensor | None, batches_done: int) -> None:
        self._resume = (epoch_start, batches_done)

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        skip = 0
        if self._resume is not None:
            start, skip = self._resume
            self._resume = None
            if start is not None and self.generator is not None:
                self.generator.set_state(start)
        # Taken before the inner sampler draws this epoch's permutation from the generator.
        if self.generator is not None:
            self.epoch_start = self.generator.get_state()
        indices = iter(self.inner)
        collections.deque(itertools.islice(indices, skip * self.batch_size), maxlen=0)
        yield from indices


class ResumeState(Callback):
    """Saves and restores the global RNG states and the training data order (see module doc).

    It wraps the datamodule's `train_dataloader` for the length of `fit`, because the only moment
    the loader's generator can be set is between the loader's creation and its first batch, and
    Lightning offers no hook there.
    """

    def __init__(self) -> None:
        self._trainer: L.Trainer | None = None
        self._pending: dict[str, Any] | None = None  # loaded from a checkpoint, not yet applied
        self._rng_pending: dict[str, Any] | None = None
        self._should_stop = False
        self._sampler: _ResumableSampler | None = None
        self._generator: torch.Generator | None = None
        self._source: Any = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        if trainer.world_size > 1:
            # Lightning rebuilds the loader around a DistributedSampler (whose order follows the
            # epoch number), so there is no sampler of ours to wrap: end-of-epoch resumes only.
            return
        source = trainer.datamodule if trainer.datamodule is not None else pl_module
        make = getattr(source.train_dataloader, "__wrapped__", source.train_dataloader)

        def train_dataloader() -> Any:
            return self._adopt(make())

        train_dataloader.__wrapped__ = make  # Lightning's is_overridden looks through it
        source.train_dataloader = train_dataloader
        self._source = source

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and self._source is not None:
            vars(self._source).pop("train_dataloader", None)
            self._source = None

    def _adopt(self, loader: Any) -> Any:
        batch_sampler = getattr(loader, "batch_sampler", None)
        if not isinstance(loader, DataLoader) or type(batch_sampler) is not BatchSampler:
            warnings.warn(
                "ResumeState needs a DataLoader built with batch_size; a resumed run "
                "will not see the same batches as an uninterrupted one",
                stacklevel=2,
            )
            return loader
        pending, self._pending = self._pending, None
        generator = loader.generator
        sampler = _ResumableSampler(batch_sampler.sampler, batch_sampler.batch_size, generator)
        if pending is not None and pending["mid_epoch"]:
            sampler.resume(pending.get("epoch_start"), int(pending["batches_done"]))
        elif pending is not None and generator is not None and pending.get("generator") is not None:
            # Before the loader's first iterator draws anything: the next epoch draws as it would
            # have in the uninterrupted run.
            generator.set_state(pending["generator"])
        batch_sampler.sampler = sampler
        self._sampler, self._generator = sampler, generator
        # We do resume this loader exactly, mid-epoch too; Lightning cannot know it.
        warnings.filterwarnings("ignore", message=".*resuming from a checkpoint that ended before")
        return loader

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "version": RESUME_STATE_VERSION,
            "rng": rng_state(),
            "mid_epoch": False,
            "batches_done": 0,
        }
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            # Also when saved during validation: its batch counter is the training epoch's.
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            state["batches_done"] = done
            state["mid_epoch"] = 0 < done < trainer.num_training_batches
        if self._sampler is not None and self._sampler.epoch_start is not None:
            state["epoch_start"] = self._sampler.epoch_start
        if self._generator is not None:
            state["generator"] = self._generator.get_state()
        if trainer is not None:  # early stopping fired: a resumed run must not train on
            state["should_stop"] = bool(trainer.should_stop)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("version") != RESUME_STATE_VERSION:
            warnings.warn(
                "the checkpoint's resume state is of another version; the resumed run "
                "will not repeat the uninterrupted one exactly",
                stacklevel=2,
            )
            return
        self._pending = dict(state_dict)
        self._rng_pending = state_dict["rng"]
        self._should_stop = bool(state_dict.get("should_stop", False))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The last moment before the first training step; nothing after it draws from these.
        if self._rng_pending is not None:
            set_rng_state(self._rng_pending)
            self._rng_pending = None
        if self._should_stop:
            # Early stopping had fired: a resumed run ends too, unless it was resumed without
            # early stopping (callbacks.early_stopping=null), to train on to max_epochs.
            if any(isinstance(cb, EarlyStopping) for cb in trainer.callbacks):
                trainer.should_stop = True
            else:
                log.info(
                    "the run had stopped before max_epochs; resumed without early stopping, it trains on"
                )
            self._should_stop = False

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Metrics logged up to a checkpoint reach the disk with it, so a run killed later still
        # has them for `continue_csv_logs` (the CSV logger writes every 100 steps otherwise).
        for logger in trainer.loggers:
            logger.save()


def continue_csv_logs(loggers: list[Any], global_step: int) -> None:
    """Keep a resumed run's CSV history: Lightning's CSVLogger deletes metrics.csv when a run
    starts. Rows from before the checkpoint stay; later ones (the killed run went on past its
    checkpoint) are dropped, since the resumed run logs those steps again."""
    for logger in loggers:
        if not isinstance(logger, CSVLogger):
            continue
        path = Path(logger.log_dir) / "metrics.csv"
        if not path.is_file():
            continue
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            rows = [r for r in reader if not r.get("step") or int(r["step"]) < global_step]
        writer = logger.experiment  # creating it deletes the old file
        with open(writer.metrics_file_path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=header)
            out.writeheader()
            out.writerows(rows)
        writer.metrics_keys = header


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
                f"in epoch {trainer.current_epoch} after batch "
                f"{batch_idx + 1} of {trainer.num_training_batches}",
            )

    # The epoch's end: only once the checkpoint callbacks, which run after us in
    # on_train_epoch_end, have saved it; that is, at the next epoch's start or the training's end.
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.received is not None:
            self._save_and_stop(trainer, f"at the end of epoch {trainer.current_epoch - 1}")

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
            f"{name}: stopped {where}; saved {path}. Resume with the same command plus "
            f"resume=auto (or ckpt_path=last) and hydra.run.dir={Path(trainer.default_root_dir)}",
            self.received,
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


class FiniteModelCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose best/top-k never holds a NaN or Inf score (Lightning ranks NaN as
    the worst score, but still saves it as the best when nothing else is saved yet), and whose
    last.ckpt is refreshed at the end of every epoch."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not bool(torch.isfinite(current).all()):
            return False
        return super().check_monitor_top_k(trainer, current)

    @property
    def state_key(self) -> str:
        # The plain ModelCheckpoint's key, so checkpoints written before this class still resume
        # their best-model bookkeeping.
        return super().state_key.replace(type(self).__qualname__, "ModelCheckpoint", 1)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # The state names its files under the folder they were written in. When the run folder
        # has since moved, Lightning drops the best score and the last path, so the first
        # resumed epoch becomes "best" however it scores, and last.ckpt, already there, is
        # written beside as last-v1.ckpt, which the next `resume=auto` does not pick. Read the
        # paths under the new folder instead, where those files are.
        old = state_dict.get("dirpath")
        if old and self.dirpath and os.path.abspath(old) != os.path.abspath(self.dirpath):
            state_dict = moved_checkpoint_state(state_dict, self.dirpath)
        super().load_state_dict(state_dict)

    # Lightning 2.6 refreshes last.ckpt only when a top-k checkpoint is saved at the same step,
    # so after epochs that do not improve the score, last.ckpt would lag behind and a killed run
    # would redo them. Here last.ckpt follows every epoch.
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(
            trainer
        ) and self._should_save_on_train_epoch_end(trainer)
        super().on_train_epoch_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        due = not self._should_skip_saving_checkpoint(
            trainer
        ) and not self._should_save_on_train_epoch_end(trainer)
        super().on_validation_end(trainer, pl_module)
        if due:
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def moved_checkpoint_state(state: dict[str, Any], dirpath: str) -> dict[str, Any]:
    """A ModelCheckpoint state whose folder has moved to `dirpath`: its file paths rewritten
    there. Unchanged (Lightning then starts the bookkeeping afresh) when the best checkpoint is
    not in the new folder, e.g. only last.ckpt was copied."""

    def moved(path: str | None) -> str | None:
        if not path:
            return path
        new = Path(dirpath) / Path(path).name
        return str(new) if new.is_file() else None

    best = moved(state.get("best_model_path"))
    if state.get("best_model_path") and best is None:
        return state
    state = dict(state, dirpath=dirpath, best_model_path=best or "")
    state["last_model_path"] = moved(state.get("last_model_path")) or ""
    state["kth_best_model_path"] = moved(state.get("kth_best_model_path")) or ""
    best_k = {moved(k): v for k, v in state.get("best_k_models", {}).items()}
    state["best_k_models"] = {k: v for k, v in best_k.items() if k is not None}
    log.info("checkpoint folder moved: reading its best and last checkpoints under %s", dirpath)
    return state


# -- disk -----------------------------------------------------------------------------------
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes `<name>.tmp` next to the checkpoint, fsyncs it, then renames it over the old one:
    a kill or a full disk mid-write leaves the previous checkpoint intact. (Lightning's own save
    goes through a temporary file in /tmp and, across filesystems, copies it over in place.)"""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
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


# -- resuming -------------------------------------------------------------------------------
TRAINING_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")


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
