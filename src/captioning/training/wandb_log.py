"""W&B: the sweep-aware logger and a table of validation captions with their attention.

Nothing here imports wandb unless a WandbLogger is in use, so CSV-only runs never load it.
Letters: B images, N regions, L generated words.
"""

import importlib.util
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger, WandbLogger
from PIL import Image

from ..data.dataset import CaptionDataset, collate
from ..data.images import load_rgb
from ..decoding import DecodeConfig
from ..errors import UserError
from ..transforms import model_view
from ..viz import caption_figure

log = logging.getLogger(__name__)


def wandb_run_info(trainer: L.Trainer) -> dict[str, Any] | None:
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
    if importlib.util.find_spec("wandb") is None:  # now, not when the first metric is logged
        raise UserError("logger=wandb needs wandb: pip install wandb, or choose logger=csv")
    job = _hydra_job()
    if job is not None:
        group = group or job["group"]
        name = name or job["name"]
        config = config if config is not None else job["config"]
    if not kwargs.get("offline") and not os.environ.get("WANDB_MODE") and not wandb_api_key_found():
        # wandb.init would stop the run with "No API key configured" (or wait at a prompt).
        kwargs["offline"] = True
        runs = Path(kwargs.get("save_dir") or kwargs.get("dir") or ".") / "wandb"
        log.warning(
            "W&B: no API key (WANDB_API_KEY or `wandb login`), so logging offline; upload later "
            "with `wandb sync %s/offline-run-*` (WANDB_MODE=offline: the same, without this line)",
            runs,
        )
    return WandbLogger(group=group, name=name, config=config, **kwargs)


def wandb_api_key_found() -> bool:
    """Whether W&B would find credentials: the environment, the netrc file `wandb login` writes,
    or wandb's settings file. Read here, without importing wandb or contacting its server."""
    import configparser
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    home = Path.home()
    netrcs = (
        [os.environ["NETRC"]] if os.environ.get("NETRC") else [home / ".netrc", home / "_netrc"]
    )
    for path in netrcs:
        try:
            auth = netrc.netrc(path).authenticators(host or "")
        except (OSError, netrc.NetrcParseError):
            continue
        if auth and auth[2]:
            return True
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or home / ".config" / "wandb")
    settings = configparser.ConfigParser()
    try:
        settings.read(config_dir / "settings")
    except configparser.Error:
        return False
    return bool(settings.get("default", "api_key", fallback=""))


def _hydra_job() -> dict[str, Any] | None:
    """Group, name and resolved config of the running Hydra job; None outside Hydra."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    from ..report import override_key, sweep_keys

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
    batch = batch._replace(
        feats=None if batch.feats is None else batch.feats.to(pl_module.device, dtype),
        images=None if batch.images is None else batch.images.to(pl_module.device, dtype),
    )
    decode = dict(decode if decode is not None else pl_module.hparams.get("val_decode") or {})
    model, vocab = pl_module.model, pl_module.vocab
    was_training = pl_module.training
    pl_module.eval()
    try:  # the best hypothesis per image, decoded as validation decodes
        beams = model.generate(model.features(batch), vocab, DecodeConfig.from_dict(decode))
    finally:
        pl_module.train(was_training)
    preprocess = model.encoder.preprocess
    out = []
    rows = _raw_rows(dataset, batch.image_ids)
    for image_id, refs, beam, row in zip(batch.image_ids, batch.refs, beams, rows, strict=True):
        # Shown from the original file, whatever the model was fed (pixels or cached features),
        # cropped to the part the model saw: the part its attention maps refer to.
        original = load_rgb(dataset.ds[row]["image"])
        image = model_view(original, preprocess)
        image.thumbnail((display_size, display_size))
        hyp = beam[0]  # its alphas (L, N), or None for decoders without attention
        out.append(
            CaptionExample(
                image_id=str(image_id),
                image=image,
                caption=vocab.decode(hyp.tokens),
                refs=list(refs),
                attention=caption_figure(
                    original, hyp.tokens, hyp.alphas, vocab.itos, preprocess, tile=tile
                ),
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
