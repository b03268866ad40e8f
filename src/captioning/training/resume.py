"""Exact resume: a resumed run continues as if it had never stopped.

- `ResumeState`: every checkpoint carries the global RNG states and the position in the shuffled
  training data.
- `continue_csv_logs`: the CSV log keeps the rows logged before the checkpoint.
The other reliability pieces: `guards.py` (signals, NaN/Inf), `checkpointing.py` (best and last
checkpoints, atomic writes), `captioning/checkpoint.py` (pre-flight checks, the format).

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
import random
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.trainer.states import TrainerFn
from torch.utils.data import BatchSampler, DataLoader, Sampler

log = logging.getLogger(__name__)


RESUME_STATE_VERSION = 1


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
