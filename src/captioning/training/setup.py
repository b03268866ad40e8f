"""What `train.py` does before and after `trainer.fit`: the run prepared from its config (each
part checked once, here), and the test results written.

Before anything slow (converting data, caching features) a run fails fast on what would stop it
later: an unwritable checkpoint folder, a missing METEOR it demands, a bad checkpoint to resume.
"""

from __future__ import annotations

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from ..checkpoint import (
    check_checkpoint_dir,
    check_resumable,
    checkpoint_bytes,
    model_state,
    read_checkpoint,
)
from ..cli import instantiate_all, resolve_ckpt_path
from ..distill import check_config as distill_config
from ..distill import check_teacher, load_teacher
from ..errors import ConfigError
from ..evaluation import caption_stats
from ..features import weights_digest
from ..meteor import require_meteor
from ..scst import check_config as scst_config
from ..vocab import Vocab
from .datamodule import CaptionDataModule
from .lit_module import CaptioningModule
from .resume import continue_csv_logs

log = logging.getLogger("train")


@dataclass
class Run:
    """A prepared training run: what `trainer.fit` and `trainer.test` take."""

    trainer: L.Trainer
    module: CaptioningModule
    datamodule: CaptionDataModule
    ckpt_path: str | None  # the checkpoint to resume from, if any
    checkpoint_callback: Any  # the ModelCheckpoint, or None
    run_dir: Path


def plain(cfg: DictConfig, key: str) -> Any:
    """A config block as plain values (None when unset)."""
    return OmegaConf.to_container(cfg[key], resolve=True) if cfg.get(key) else None


@rank_zero_only
def say(line: str) -> None:
    """A line for the user, once per run (not once per DDP process), never buffered."""
    print(line, flush=True)


def continue_wandb_run(cfg: DictConfig, resume_from: dict[str, Any] | None) -> None:
    """A resumed run logs on into the W&B run it started (its id, kept in the checkpoint by
    RunInfo), not into a new one: one job, one W&B run, however often it was interrupted."""
    wandb_cfg = (cfg.get("logger") or {}).get("wandb")
    if resume_from is None or wandb_cfg is None or wandb_cfg.get("id"):
        return
    run_id = ((resume_from.get("callbacks") or {}).get("RunInfo") or {}).get("wandb_run_id")
    if run_id:
        with open_dict(cfg):
            wandb_cfg.id = run_id  # WandbLogger resumes a run given its id (resume="allow")


def prepare_run(cfg: DictConfig) -> Run:
    """Trainer, callbacks, data and module from `cfg`, checked before the first epoch."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    say(f"run directory: {run_dir}")
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, resume=cfg.get("resume", "never"))
    resume_from = read_checkpoint(ckpt_path) if ckpt_path else None
    continue_wandb_run(cfg, resume_from)
    trainer, callbacks = instantiate_all(cfg)
    ckpt_cb = callbacks.get("model_checkpoint")
    ckpt_dir = Path(ckpt_cb.dirpath) if ckpt_cb is not None and ckpt_cb.dirpath else None
    ckpt_dir = ckpt_dir or run_dir / "checkpoints"
    # Before the data is converted or its features cached, which can take long: a run that
    # cannot save fails now, not at the end of its first epoch; a bad checkpoint likewise.
    check_checkpoint_dir(ckpt_dir)
    # Optional tools met only after training (METEOR at the test step): a run that demands one
    # that is missing stops now; `auto` goes on and reports it as null.
    if cfg.test:
        require_meteor(cfg.test_decode.get("meteor"), "test_decode.meteor")

    encoder_cfg, decoder_cfg = plain(cfg, "encoder"), plain(cfg, "decoder")
    scst = scst_config(plain(cfg, "scst")) if cfg.get("scst") else None
    if scst and not cfg.get("init_from") and not cfg.ckpt_path:
        raise ConfigError(
            "self-critical training starts from a trained model: give init_from=<checkpoint.ckpt>"
        )
    # init_from: start from a trained model (e.g. self-critical after cross-entropy); its
    # checkpoint fixes the vocabulary and the architecture, the config everything else.
    init = read_checkpoint(cfg.init_from) if cfg.get("init_from") else None
    vocab = None
    if init is not None:
        info = init["captioning"]
        encoder_cfg = dict(info["encoder"])
        if encoder_cfg.get("fine_tune", "none") != "none":
            # The weights come from the checkpoint: never fetch the pretrained ones again. A
            # frozen encoder is built as it was, so its cached features are found again.
            encoder_cfg["pretrained"] = False
        decoder_cfg = dict(info["decoder"])
        vocab = Vocab.from_dict(info["vocab"])
        log.info("initialising from %s (%s + %s)", cfg.init_from, encoder_cfg, decoder_cfg)

    # distill: a single model learns a teacher's (an ensemble's) word distributions
    distill = distill_config(plain(cfg, "distill")) if cfg.get("distill") else None
    if distill and scst:
        raise ConfigError("distill and scst are separate stages: set one of them")
    teacher = load_teacher(distill) if distill else None
    if teacher is not None and vocab is None:
        vocab = teacher.vocab  # the student predicts over the teacher's words

    dm = CaptionDataModule(
        plain(cfg, "data"),
        cache_dir=cfg.paths.cache_dir,
        seed=cfg.seed,
        vocab=vocab,
        train_per_image=bool(scst),
    ).load()
    module = CaptioningModule(
        encoder=encoder_cfg,
        decoder=decoder_cfg,
        vocab=dm.vocab.to_dict(),
        optim=plain(cfg, "optim"),
        val_decode=plain(cfg, "val_decode"),
        test_decode=plain(cfg, "test_decode"),
        data_info=dm.info(),
        monitor=cfg.monitor,
        compile=bool(cfg.get("compile", False)),
        scst=scst,
        distill=distill,
    )
    if init is not None:
        module.model.load_state_dict(model_state(init["state_dict"]))
        if encoder_cfg.get("fine_tune", "none") != "none":  # fine-tuned weights: their own cache
            module.model.encoder.weights_id = "init:" + weights_digest(module.model.encoder)
        del init
    cached = dm.use_feature_cache(module.model.encoder)
    if cached:
        log.info("frozen encoder: training from cached features under %s", dm.cache_dir)
    if teacher is not None:
        check_teacher(teacher, dm.vocab.itos, module.model.encoder if cached else None)
        module.set_teacher(teacher)
        log.info("distilling from %s", " + ".join(distill["teachers"]))
    log.info("data %s: %s, vocabulary %d words", dm.cfg["name"], dm.info()["sizes"], len(dm.vocab))
    kept = max(ckpt_cb.save_top_k, 1) if ckpt_cb is not None else 1
    check_checkpoint_dir(ckpt_dir, need_bytes=checkpoint_bytes(module) * (kept + 2))  # + last, tmp
    if resume_from is not None:
        check_resumable(resume_from, ckpt_path, module)
        log.info(
            "resuming from %s (epoch %s, step %s)",
            ckpt_path,
            resume_from.get("epoch"),
            resume_from.get("global_step"),
        )
        # A resumed run writes on into its own folders on purpose: Lightning's warnings that they
        # are not empty say nothing about it (a fresh run into a used folder still gets them).
        for folder in ("Experiment logs directory", "Checkpoint directory"):
            warnings.filterwarnings("ignore", message=rf"{folder} .* exists and is not empty")
        continue_csv_logs(trainer.loggers, int(resume_from.get("global_step", 0)))
    return Run(trainer, module, dm, ckpt_path, ckpt_cb, run_dir)


def already_tested(run_dir: Path, best_path: str, decode: dict[str, Any]) -> dict | None:
    """The run's test_metrics.json when it scored this very checkpoint with this decoding and
    the checkpoint has not been written since; else None."""
    path = run_dir / "test_metrics.json"
    if not best_path or not path.is_file() or not (run_dir / "test_predictions.json").is_file():
        return None
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = previous.get("checkpoint") == best_path and previous.get("decode") == decode
    best = Path(best_path)
    if not same or not best.is_file() or best.stat().st_mtime > path.stat().st_mtime:
        return None
    return previous if isinstance(previous.get("metrics"), dict) else None


def finished_before(cfg: DictConfig) -> dict[str, Any] | None:
    """A run resumed after it finished (a sweep run again): its run_info.json when it completed
    all of `trainer.max_epochs` and its best checkpoint was tested with this decoding; else None.

    Such a run has nothing left to do, so train.py starts nothing: no trainer, no data, no new
    W&B run (which would be an empty second folder under the job's id). A run stopped early, or
    resumed with more epochs, goes through the trainer as usual.
    """
    resume = cfg.get("resume", "never")
    max_epochs = (cfg.get("trainer") or {}).get("max_epochs")
    if resume == "never" or not cfg.get("test") or not max_epochs or max_epochs < 0:
        return None
    run_dir = Path(cfg.paths.output_dir)
    try:
        info = json.loads((run_dir / "run_info.json").read_text())
        scored = json.loads((run_dir / "test_metrics.json").read_text())
    except (OSError, ValueError):
        return None
    if info.get("status") != "completed" or int(info.get("epochs") or 0) < max_epochs:
        return None
    if already_tested(run_dir, scored.get("checkpoint") or "", dict(cfg.test_decode)) is None:
        return None
    return info


def test_best(run: Run, cfg: DictConfig) -> None:
    """Test the best checkpoint (else the final weights); write test_metrics.json and
    test_predictions.json in the run directory and print the scores."""
    ckpt_cb, trainer, module = run.checkpoint_callback, run.trainer, run.module
    best_path = ckpt_cb.best_model_path if ckpt_cb is not None else ""
    if ckpt_cb is not None and not best_path:
        log.warning(
            "no checkpoint with a finite %s was saved: testing the final weights", cfg.monitor
        )
    previous = already_tested(run.run_dir, best_path, dict(cfg.test_decode))
    if previous is not None:  # a finished run resumed (a sweep run again): test once per model
        if trainer.is_global_zero:
            print(
                f"test ({Path(best_path).name}): scored before, {run.run_dir / 'test_metrics.json'}:"
            )
            print(json.dumps({"test": previous["metrics"]}, indent=2))
        return
    # verbose=False: the scores print once, below, not also as Lightning's table
    trainer.test(
        module,
        datamodule=run.datamodule,
        ckpt_path=best_path or None,
        weights_only=True,
        verbose=False,
    )
    if not trainer.is_global_zero:
        return
    metrics = dict(module.test_metrics)
    out = {
        "split": "test",
        "checkpoint": best_path,
        "decode": dict(cfg.test_decode),
        "metrics": metrics,
        "captions": caption_stats(module.test_predictions),
    }
    (run.run_dir / "test_metrics.json").write_text(json.dumps(out, indent=2))
    preds = [{"image_id": k, "caption": v} for k, v in module.test_predictions.items()]
    (run.run_dir / "test_predictions.json").write_text(json.dumps(preds, indent=1))
    d = cfg.test_decode
    tested = Path(best_path).name if best_path else "the final weights"
    print(f"test ({tested}, beam {d.beam_size}, length penalty {d.length_penalty}):")
    print(json.dumps({"test": metrics}, indent=2))
