"""Old import path of the Lightning callbacks, kept for configs that name it in `_target_`
(`callbacks.ema={_target_: captioning.callbacks.WeightEMA, ...}`, saved `.hydra/config.yaml`);
the callbacks live in `captioning.training`."""

from .training.callbacks import LineProgress, RunInfo, ValidationSummary, WeightEMA, progress_bar
from .training.wandb_log import WandbCaptionTable, wandb_logger

__all__ = [
    "LineProgress",
    "RunInfo",
    "ValidationSummary",
    "WandbCaptionTable",
    "WeightEMA",
    "progress_bar",
    "wandb_logger",
]
