"""Old import path of the reliability callbacks, kept for configs that name it in `_target_`
(saved `.hydra/config.yaml` files); they live in `captioning.training`."""

from .training.checkpointing import AtomicCheckpointIO, FiniteModelCheckpoint
from .training.guards import GracefulInterrupt, NonFiniteGuard
from .training.resume import ResumeState

__all__ = [
    "AtomicCheckpointIO",
    "FiniteModelCheckpoint",
    "GracefulInterrupt",
    "NonFiniteGuard",
    "ResumeState",
]
