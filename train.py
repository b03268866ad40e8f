"""Train a captioner: `python train.py [encoder=resnet101] [data=flickr8k] [trainer.devices=2]`.

Interrupted runs continue where they stopped: `python train.py <same overrides>
hydra.run.dir=<run dir> resume=auto` (or `ckpt_path=last`); see captioning/training/resume.py.
"""

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from captioning.checkpoint import (
    check_checkpoint_dir,
    check_resumable,
    checkpoint_bytes,
    model_state,
    read_checkpoint,
)
from captioning.cli import instantiate_all, resolve_ckpt_path, run_safely
from captioning.distill import check_config as distill_config
from captioning.distill import check_teacher, load_teacher
from captioning.errors import ConfigError
from captioning.evaluation import caption_stats
from captioning.features import weights_digest
from captioning.meteor import require_meteor
from captioning.scst import check_config as scst_config
from captioning.training.datamodule import CaptionDataModule
from captioning.training.lit_module import CaptioningModule
from captioning.training.resume import continue_csv_logs
from captioning.vocab import Vocab

log = logging.getLogger("train")


def train(cfg: DictConfig) -> float | None:
    """Fit, then test the best checkpoint; returns the best selection metric for sweepers."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    say(f"run directory: {run_dir}")
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
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir, resume=cfg.get("resume", "never"))
    resume_from = read_checkpoint(ckpt_path) if ckpt_path else None

    encoder_cfg = OmegaConf.to_container(cfg.encoder, resolve=True)
    decoder_cfg = OmegaConf.to_container(cfg.decoder, resolve=True)
    # init_from: start from a trained model (e.g. self-critical after cross-entropy); its
    # checkpoint fixes the vocabulary and the architecture, the config everything else.
    scst = scst_config(OmegaConf.to_container(cfg.scst, resolve=True)) if cfg.get("scst") else None
    if scst and not cfg.get("init_from") and not cfg.ckpt_path:
        raise ConfigError(
            "self-critical training starts from a trained model: give init_from=<checkpoint.ckpt>"
        )
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
    distill = None
    if cfg.get("distill"):
        distill = distill_config(OmegaConf.to_container(cfg.distill, resolve=True))
        if scst:
            raise ConfigError("distill and scst are separate stages: set one of them")
    teacher = load_teacher(distill) if distill else None
    if teacher is not None and vocab is None:
        vocab = teacher.vocab  # the student predicts over the teacher's words

    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = CaptionDataModule(
        data_cfg,
        cache_dir=cfg.paths.cache_dir,
        seed=cfg.seed,
        vocab=vocab,
        train_per_image=bool(scst),
    ).load()
    module = CaptioningModule(
        encoder=encoder_cfg,
        decoder=decoder_cfg,
        vocab=dm.vocab.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        val_decode=OmegaConf.to_container(cfg.val_decode, resolve=True),
        test_decode=OmegaConf.to_container(cfg.test_decode, resolve=True),
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
        continue_csv_logs(trainer.loggers, int(resume_from.get("global_step", 0)))
        del resume_from
    # weights_only: Lightning reads the checkpoint again; nothing in it may run code.
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)

    best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    if cfg.test:
        best_path = ckpt_cb.best_model_path if ckpt_cb is not None else ""
        if ckpt_cb is not None and not best_path:
            log.warning(
                "no checkpoint with a finite %s was saved: testing the final weights", cfg.monitor
            )
        # verbose=False: the scores print once, below, not also as Lightning's table
        trainer.test(
            module, datamodule=dm, ckpt_path=best_path or None, weights_only=True, verbose=False
        )
        if trainer.is_global_zero:
            metrics = {k: v for k, v in module.test_metrics.items()}
            out = {
                "split": "test",
                "checkpoint": best_path,
                "decode": dict(cfg.test_decode),
                "metrics": metrics,
                "captions": caption_stats(module.test_predictions),
            }
            (run_dir / "test_metrics.json").write_text(json.dumps(out, indent=2))
            preds = [{"image_id": k, "caption": v} for k, v in module.test_predictions.items()]
            (run_dir / "test_predictions.json").write_text(json.dumps(preds, indent=1))
            d = cfg.test_decode
            tested = Path(best_path).name if best_path else "the final weights"
            print(f"test ({tested}, beam {d.beam_size}, length penalty {d.length_penalty}):")
            print(json.dumps({"test": metrics}, indent=2))
    say(f"done: run directory {run_dir} (checkpoints/, csv/metrics.csv, test_metrics.json)")
    return float(best) if best is not None else None


@rank_zero_only
def say(line: str) -> None:
    """A line for the user, once per run (not once per DDP process), never buffered."""
    print(line, flush=True)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_safely(train, cfg)


if __name__ == "__main__":
    main()
