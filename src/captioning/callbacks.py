"""Lightning callbacks: `run_info.json` for sweep reports, W&B caption tables, weight EMA.

Nothing here imports wandb unless a WandbLogger is in use, so CSV-only runs never load it.
Letters: B images, N regions, L generated words.
"""

import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from .data.images import load_rgb
from .datamodule import CaptionDataset, collate
from .decoding import Hypothesis, generate
from .transforms import model_view
from .viz import attention_figure

log = logging.getLogger(__name__)


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
        status = "interrupted" if isinstance(exception, KeyboardInterrupt) else "failed"
        self._write(trainer, pl_module, status, error=f"{type(exception).__name__}: {exception}")

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "train_time_s": self.train_time_s(),
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
            "wandb_run": _wandb_run_info(trainer),
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        path = Path(self.path or Path(trainer.default_root_dir) / "run_info.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, path)  # a report reading it mid-run never sees half a file


def _wandb_run_info(trainer: L.Trainer) -> dict[str, Any] | None:
    """The W&B run's id, name and (online) address, when one was started."""
    if find_wandb_logger(trainer) is None:
        return None
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return None
    url = None if getattr(run, "offline", False) else run.url  # .url warns when offline
    return {"id": run.id, "name": run.name, "group": run.group, "url": url, "dir": run.dir}


# -- W&B ----------------------------------------------------------------------------------------
def find_wandb_logger(trainer: L.Trainer) -> WandbLogger | None:
    """The trainer's WandbLogger, if any (fast_dev_run swaps loggers for dummies: then none)."""
    return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)


def wandb_logger(
    group: str | None = None,
    name: str | None = None,
    config: dict[str, Any] | None = None,
    **kwargs: Any,
) -> Logger:
    """Lightning's WandbLogger, grouped and named for sweeps, with the job's resolved config.

    Under Hydra, unset values default to: `group` the multirun directory's name (one W&B group per
    sweep; none for a single run), `name` the job's swept overrides (all its overrides outside a
    sweep), `config` the resolved config the job saved in `.hydra/config.yaml`. Other arguments go
    to `WandbLogger` (and from there to `wandb.init`).
    """
    job = _hydra_job()
    if job is not None:
        group = group or job["group"]
        name = name or job["name"]
        config = config if config is not None else job["config"]
    return WandbLogger(group=group, name=name, config=config, **kwargs)


def _hydra_job() -> dict[str, Any] | None:
    """Group, name and resolved config of the running Hydra job; None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from .report import override_key, sweep_keys

    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    group, shown = None, overrides
    if hc.mode == RunMode.MULTIRUN:
        sweep_dir = Path(hc.sweep.dir)
        group = sweep_dir.name
        keys = sweep_keys(sweep_dir, OmegaConf.to_container(hc.sweeper, resolve=False))
        shown = [o for o in overrides if override_key(o) in keys] or overrides
    config = None
    if hc.output_subdir is not None:
        path = Path(hc.runtime.output_dir) / hc.output_subdir / "config.yaml"
        if path.is_file():
            cfg = OmegaConf.load(path)
            try:  # interpolations such as ${hydra:runtime.output_dir} resolve inside the job
                config = OmegaConf.to_container(cfg, resolve=True)
            except Exception as e:  # a config that cannot resolve is still worth recording
                log.warning("logging the unresolved config to W&B: %s", e)
                config = OmegaConf.to_container(cfg, resolve=False)
            config["overrides"] = overrides
    return {"group": group, "name": ",".join(shown) or None, "config": config}


# -- caption tables -------------------------------------------------------------------------------
@dataclass
class CaptionExample:
    """One validation image with what the model says about it."""

    image_id: str
    image: Image.Image  # the raw image, at most `display_size` on its longer side
    caption: str
    refs: list[str]
    attention: Image.Image  # the image, then one overlay per generated word


TABLE_COLUMNS = ["epoch", "image_id", "image", "caption", "references", "attention"]


def decode_hypotheses(
    pl_module: L.LightningModule, feats: torch.Tensor, decode: dict[str, Any]
) -> list[Hypothesis]:
    """The best hypothesis per image, decoded as validation decodes (the `val_decode` settings)."""
    vocab = pl_module.vocab
    beams = generate(
        pl_module.model.decoder,
        feats,
        beam_size=int(decode.get("beam_size", 1)),
        start_id=vocab.start_id,
        end_id=vocab.end_id,
        pad_id=vocab.pad_id,
        max_len=int(decode.get("max_len") or vocab.max_len),
        length_penalty=float(decode.get("length_penalty", 1.0)),
        banned=vocab.banned(bool(decode.get("allow_unk", False))),
        no_repeat_ngram=int(decode.get("no_repeat_ngram", 0)),
    )
    return [b[0] for b in beams]


def _grid(n_regions: int) -> int | None:
    side = int(round(n_regions**0.5))
    return side if side * side == n_regions else None


def _raw_rows(dataset: CaptionDataset, image_ids: list[str]) -> list[int]:
    """Rows of the underlying table for these ids (preloading may have dropped bad images)."""
    if len(dataset.ds) == len(dataset.image_ids):
        return [dataset.image_ids.index(i) for i in image_ids]
    row_of = {image_id: j for j, image_id in enumerate(dataset.ds["image_id"])}
    return [row_of[i] for i in image_ids]


@torch.no_grad()
def caption_examples(
    pl_module: L.LightningModule,
    dataset: CaptionDataset,
    indices: Iterable[int],
    decode: dict[str, Any] | None = None,
    tile: int = 96,
    display_size: int = 256,
) -> list[CaptionExample]:
    """Caption evaluation-split images `indices` with the module (images or cached features)."""
    idx = [i for i in indices if i < len(dataset.image_ids)]
    if not idx:
        return []
    batch = collate([dataset[i] for i in idx])
    # Validation batches get the precision plugin's cast; here match the weights (bf16-true).
    dtype = next(pl_module.parameters()).dtype
    inputs = {k: batch[k].to(pl_module.device, dtype) for k in ("feats", "images") if k in batch}
    decode = dict(decode if decode is not None else pl_module.hparams.get("val_decode") or {})
    was_training = pl_module.training
    pl_module.eval()
    try:
        feats = pl_module.features(inputs)  # (B, N, D)
        hyps = decode_hypotheses(pl_module, feats, decode)
    finally:
        pl_module.train(was_training)
    grid = _grid(feats.size(1))
    itos = pl_module.vocab.itos
    preprocess = pl_module.model.encoder.preprocess
    out = []
    for image_id, refs, hyp, row in zip(
        batch["image_ids"],
        batch["refs"],
        hyps,
        _raw_rows(dataset, batch["image_ids"]),
        strict=True,
    ):
        # Shown from the original file, whatever the model was fed (pixels or cached features),
        # cropped to the part the model saw: the part its attention maps refer to.
        image = model_view(load_rgb(dataset.ds[row]["image"]), preprocess)
        image.thumbnail((display_size, display_size))
        words = [itos[t] for t in hyp.tokens]
        alphas = hyp.alphas  # (L, N), or None for decoders without attention
        out.append(
            CaptionExample(
                image_id=str(image_id),
                image=image,
                caption=pl_module.vocab.decode(hyp.tokens),
                refs=list(refs),
                attention=attention_figure(image, words, alphas, grid, tile=tile),
            )
        )
    return out


def table_rows(examples: list[CaptionExample], epoch: int, wandb: Any) -> list[list[Any]]:
    """Rows for a `wandb.Table` with `TABLE_COLUMNS` (wandb passed in: imported by the caller)."""
    return [
        [
            epoch,
            ex.image_id,
            wandb.Image(ex.image),
            ex.caption,
            "\n".join(ex.refs),
            wandb.Image(ex.attention, caption=ex.caption),
        ]
        for ex in examples
    ]


class WandbCaptionTable(Callback):
    """After every validation epoch, a W&B Table of the first `num_images` validation images.

    Each row has the generated caption (decoded with the `val_decode` settings), the references
    and the attention overlays. Does nothing without a WandbLogger, and runs on global rank 0
    only: it decodes a handful of images itself, so no other rank has to wait for it.
    """

    def __init__(
        self,
        num_images: int = 8,
        key: str = "val/captions",
        every_n_epochs: int = 1,
        tile: int = 96,
        split: str = "val",
    ):
        self.num_images = num_images
        self.key = key
        self.every_n_epochs = max(1, every_n_epochs)
        self.tile = tile
        self.split = split

    def _dataset(self, trainer: L.Trainer) -> CaptionDataset:
        dm = trainer.datamodule
        if dm is not None and hasattr(dm, "dataset"):
            return dm.dataset(self.split)
        loaders = trainer.val_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        return loader.dataset

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or self.num_images <= 0:
            return
        if trainer.current_epoch % self.every_n_epochs:
            return
        logger = find_wandb_logger(trainer)
        if logger is None:
            return
        import wandb

        examples = caption_examples(
            pl_module, self._dataset(trainer), range(self.num_images), tile=self.tile
        )
        logger.log_table(
            key=self.key,
            columns=TABLE_COLUMNS,
            data=table_rows(examples, trainer.current_epoch, wandb),
            step=trainer.global_step,
        )
