"""The checkpoint callback and the checkpoint writer Lightning uses."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from ..checkpoint import save_atomic

log = logging.getLogger(__name__)


class FiniteModelCheckpoint(ModelCheckpoint):
    """A ModelCheckpoint whose best/top-k never holds a NaN or Inf score (Lightning ranks NaN as
    the worst score, but still saves it as the best when nothing else is saved yet), and whose
    last.ckpt is refreshed at the end of every epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # One file per name, overwritten: last.ckpt is the file SIGTERM saves and resume=auto
        # reads. With Lightning's version counter, a run resumed from a checkpoint saved before
        # any epoch ended (the callback has no last_model_path yet) writes its epoch-end
        # checkpoints to last-v1.ckpt beside it, and a later kill would resume from the older.
        kwargs.setdefault("enable_version_counter", False)
        super().__init__(*args, **kwargs)

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
    """Writes through `checkpoint.save_atomic`: a kill or a full disk mid-write leaves the
    previous checkpoint intact. (Lightning's own save goes through a temporary file in /tmp
    and, across filesystems, copies it over in place.)"""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        save_atomic(checkpoint, path)
