"""Evaluate a checkpoint: `python evaluate.py ckpt_path=x.ckpt [split=test] [decode.beam_size=3]`.

An ensemble of checkpoints (their word probabilities averaged at every step):
`python evaluate.py 'ckpt_path=[a.ckpt,b.ckpt]'`.
"""

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from captioning.cli import run_safely
from captioning.decoding import DecodeConfig
from captioning.evaluation import caption_dataset, caption_stats, summary, write_report
from captioning.inference import load_model, resolve_device
from captioning.meteor import require_meteor
from captioning.metrics import score_corpus
from captioning.training.datamodule import CaptionDataModule

log = logging.getLogger("evaluate")


def evaluate(cfg: DictConfig) -> dict:
    run_dir = Path(cfg.paths.output_dir)
    # before the model is loaded and the split captioned: demanded METEOR must be able to run
    meteor = require_meteor(cfg.decode.get("meteor"), "decode.meteor")
    device = resolve_device(cfg.device)
    ckpt = cfg.ckpt_path
    ckpt = [str(p) for p in ckpt] if OmegaConf.is_list(ckpt) else str(ckpt)  # a list: an ensemble
    cm = load_model(ckpt, device=device)
    data_cfg = (
        OmegaConf.to_container(cfg.data, resolve=True)
        if cfg.data is not None
        else cm.meta["data"]["config"]
    )
    dm = CaptionDataModule(
        data_cfg, cache_dir=cfg.paths.cache_dir, preprocess=cm.preprocess, vocab=cm.vocab
    )
    dataset = dm.dataset(cfg.split, evaluation=True)
    batch_size = int(cfg.batch_size or data_cfg.get("eval_batch_size", 100))
    d = cfg.decode
    preds, refs, hyps = caption_dataset(
        cm,
        dataset,
        batch_size=batch_size,
        decode=DecodeConfig.from_dict(d),
    )
    scores = score_corpus(preds, refs, meteor=meteor, per_image=True)
    per_image = scores.pop("per_image")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "predictions.json").write_text(
        json.dumps([{"image_id": k, "caption": v} for k, v in preds.items()], indent=1)
    )
    (run_dir / "per_image_scores.json").write_text(json.dumps(per_image, indent=1))
    out = {
        "checkpoint": ckpt,
        "split": cfg.split,
        "images": len(preds),
        "decode": OmegaConf.to_container(d),
        "metrics": scores,
        "captions": caption_stats(preds),
    }
    (run_dir / "metrics.json").write_text(json.dumps(out, indent=2))
    if cfg.report:
        path = write_report(
            run_dir,
            cm,
            dataset,
            preds,
            refs,
            hyps,
            per_image,
            n=int(cfg.report_examples),
            scores=scores,
            decode=out["decode"],
            split=cfg.split,
        )
        log.info("report: %s", path)
    print(json.dumps({cfg.split: summary(scores)}, indent=2))
    return scores


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_safely(evaluate, cfg)


if __name__ == "__main__":
    main()
