"""Train a captioner: `python train.py [encoder=resnet101] [data=flickr8k] [trainer.devices=2]`."""

import json
import logging
from pathlib import Path

import hydra
import lightning as L
from omegaconf import DictConfig, OmegaConf

from captioning.cli import instantiate_all, resolve_ckpt_path, run_safely
from captioning.datamodule import CaptionDataModule
from captioning.lit_module import CaptioningModule

log = logging.getLogger("train")


def train(cfg: DictConfig) -> float | None:
    """Fit, then test the best checkpoint; returns the best selection metric for sweepers."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    dm = CaptionDataModule(data_cfg, cache_dir=cfg.paths.cache_dir, seed=cfg.seed).load()
    module = CaptioningModule(
        encoder=OmegaConf.to_container(cfg.encoder, resolve=True),
        decoder=OmegaConf.to_container(cfg.decoder, resolve=True),
        vocab=dm.vocab.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        val_decode=OmegaConf.to_container(cfg.val_decode, resolve=True),
        test_decode=OmegaConf.to_container(cfg.test_decode, resolve=True),
        data_info=dm.info(),
        monitor=cfg.monitor,
    )
    if dm.use_feature_cache(module.model.encoder):
        log.info("frozen encoder: training from cached features under %s", dm.cache_dir)
    log.info("data %s: %s, vocabulary %d words", dm.cfg["name"], dm.info()["sizes"], len(dm.vocab))
    trainer, callbacks = instantiate_all(cfg)
    trainer.fit(module, datamodule=dm, ckpt_path=resolve_ckpt_path(cfg.ckpt_path, run_dir))

    ckpt_cb = callbacks.get("model_checkpoint")
    best = ckpt_cb.best_model_score if ckpt_cb is not None else None
    if cfg.test:
        best_path = ckpt_cb.best_model_path if ckpt_cb is not None else ""
        trainer.test(module, datamodule=dm, ckpt_path=best_path or None, weights_only=False)
        if trainer.is_global_zero:
            metrics = {k: v for k, v in module.test_metrics.items()}
            out = {"split": "test", "checkpoint": best_path, "decode": dict(cfg.test_decode),
                   "metrics": metrics}
            (run_dir / "test_metrics.json").write_text(json.dumps(out, indent=2))
            preds = [{"image_id": k, "caption": v} for k, v in module.test_predictions.items()]
            (run_dir / "test_predictions.json").write_text(json.dumps(preds, indent=1))
            print(json.dumps({"test": metrics}, indent=2))
    return float(best) if best is not None else None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_safely(train, cfg)


if __name__ == "__main__":
    main()
