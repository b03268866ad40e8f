"""Train a captioner: `python train.py [encoder=resnet101] [data=flickr8k] [trainer.devices=2]`.

Interrupted runs continue where they stopped: `python train.py <same overrides>
hydra.run.dir=<run dir> resume=auto` (or `ckpt_path=last`); see captioning/training/resume.py.
"""

import hydra
from omegaconf import DictConfig

from captioning.cli import run_safely
from captioning.training.setup import finished_before, prepare_run, say, test_best


def train(cfg: DictConfig) -> float | None:
    """Fit, then test the best checkpoint; returns the best selection metric for sweepers."""
    done = finished_before(cfg)
    if done is not None:  # a finished sweep job run again: nothing to train or test
        say(f"finished before: {cfg.paths.output_dir} (run_info.json, test_metrics.json)")
        return done.get("best_score")
    run = prepare_run(cfg)
    # weights_only: Lightning reads the checkpoint again; nothing in it may run code.
    run.trainer.fit(
        run.module, datamodule=run.datamodule, ckpt_path=run.ckpt_path, weights_only=True
    )
    if cfg.test:
        test_best(run, cfg)
    say(f"done: run directory {run.run_dir} (checkpoints/, csv/metrics.csv, test_metrics.json)")
    best = run.checkpoint_callback.best_model_score if run.checkpoint_callback is not None else None
    return float(best) if best is not None else None


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_safely(train, cfg)


if __name__ == "__main__":
    main()
