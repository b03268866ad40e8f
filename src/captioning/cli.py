"""Glue shared by the Hydra entry points: instantiate the trainer, print user errors cleanly."""

import logging
import re
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ConfigError, UserError

log = logging.getLogger("captioning")

# Keys of the `trainer` group that are not Trainer arguments: instantiate_all applies them.
TRAINER_EXTRAS = ("matmul_precision",)
MATMUL_PRECISIONS = ("highest", "high", "medium")


def run_safely(fn: Callable[[Any], Any], cfg: Any) -> Any:
    """Run an entry point; a user error prints one clear line and exits with status 2.

    An error may carry its own `exit_code` (a training stopped by SIGTERM exits 128 + 15, as
    if killed, so a scheduler still sees that the job did not finish).
    """
    try:
        from lightning.fabric.utilities.exceptions import MisconfigurationException
    except ImportError:  # the app and scorer run without Lightning
        MisconfigurationException = UserError  # noqa: N806
    try:
        return fn(cfg)
    except (UserError, MisconfigurationException) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:  # outside training (data preparation, testing): nothing to save
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    finally:
        # Each multirun job must be its own W&B run, not a continuation of the previous one.
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()


# Hydra's own command-line flags that take a value (`python caption.py --help` lists them).
_VALUE_FLAGS = {"-cp", "-cn", "-cd", "-c", "-p", "--cfg", "--package", "--experimental-rerun"}
_VALUE_FLAGS |= {"--config-path", "--config-name", "--config-dir"}
_INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _is_override(arg: str) -> bool:
    """`key=value`, `+key=value`, `~key`: Hydra's override grammar; anything else is a path."""
    if arg.startswith("~") and "/" not in arg:
        return True
    return "=" in arg and not Path(arg).exists()


def hydra_quote(text: str) -> str:
    """`text` as a quoted Hydra string that reads back unchanged (commas, quotes, `${`)."""
    text = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def paths_as_override(argv: list[str], key: str = "images") -> list[str]:
    """`a.jpg dir/ x=1` -> `x=1 images=['a.jpg','dir/']`: plain paths become one list override.

    Lets `python caption.py photo.jpg other.png` work as a user expects beside Hydra's form
    (`images=[photo.jpg,other.png]`), which stays valid. Hydra's flags and their values
    (`--cfg job`, `-cn name`, `--info defaults`) are left where they are.
    """
    kept: list[str] = []
    paths: list[str] = []
    at = 0  # the list goes where the first path was: Hydra's overrides must stay together
    takes_value = False
    for i, arg in enumerate(argv):
        if takes_value:
            kept.append(arg)
            takes_value = False
        elif arg.startswith("-"):
            kept.append(arg)
            takes_value = arg in _VALUE_FLAGS or (
                arg in ("-i", "--info") and i + 1 < len(argv) and argv[i + 1] in _INFO_CHOICES
            )
        elif _is_override(arg):
            kept.append(arg)
        else:
            at = len(kept) if not paths else at
            paths.append(arg)
    if not paths:
        return list(argv)
    if any(a.lstrip("+").startswith(f"{key}=") for a in kept):
        print(
            f"error: give the images either as paths or as {key}=[...], not both", file=sys.stderr
        )
        sys.exit(2)
    return [*kept[:at], f"{key}=[{','.join(hydra_quote(p) for p in paths)}]", *kept[at:]]


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud services, printed at every Trainer start."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("\N{ELECTRIC LIGHT BULB} Tip:")


_DROP_TIPS = _DropTips()


def quiet_known_noise() -> None:
    """Silence third-party messages that say nothing about this run, each at its source.

    Only these: Lightning's "Tip" lines (litlogger, litmodels) and the deprecation of
    `LeafSpec` that Lightning's own pytree code triggers in torch >= 2.10 at every fit, validation
    and test; every other warning still shows. Without a terminal the `datasets` library's
    progress bars, redrawn in place, would fill a log file with fragments: they are turned off.
    """
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DROP_TIPS)
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )
    if not sys.stdout.isatty() and "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def instantiate_all(cfg: Any):
    """Trainer with its callbacks and loggers from the `trainer`, `callbacks`, `logger` groups."""
    import hydra
    from omegaconf import OmegaConf

    callbacks = {
        k: hydra.utils.instantiate(v)
        for k, v in (cfg.get("callbacks") or {}).items()
        if v is not None and "_target_" in v
    }
    loggers = []
    for name, v in (cfg.get("logger") or {}).items():
        if v is None or "_target_" not in v:
            continue
        try:
            loggers.append(hydra.utils.instantiate(v))
        except Exception as e:  # Hydra wraps the logger's own message (e.g. a missing package)
            cause = e.__cause__ or e
            if isinstance(cause, UserError):
                raise cause from None
            raise UserError(f"invalid logger config {name}: {cause}") from None
    if not loggers:
        callbacks.pop("lr_monitor", None)  # it needs a logger
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    extras = {k: trainer_cfg.pop(k) for k in TRAINER_EXTRAS if k in trainer_cfg}
    if trainer_cfg.get("fast_dev_run"):
        callbacks.pop("lr_monitor", None)
    if not trainer_cfg.get("enable_progress_bar", True):
        callbacks.pop("progress", None)  # Lightning refuses a progress bar it was told not to show
    quiet_known_noise()
    extra = {}
    if not trainer_cfg.get("plugins"):
        from .training.checkpointing import AtomicCheckpointIO

        extra["plugins"] = [AtomicCheckpointIO()]  # a kill mid-save keeps the old checkpoint
    try:
        trainer = hydra.utils.instantiate(
            trainer_cfg, callbacks=list(callbacks.values()), logger=loggers or False, **extra
        )
    except Exception as e:  # Hydra wraps the Trainer's own message about a bad value
        cause = e.__cause__ or e
        raise UserError(f"invalid trainer config: {cause}") from None
    apply_cuda_settings(trainer, extras.get("matmul_precision", "highest"))
    return trainer, callbacks


def apply_cuda_settings(trainer: Any, matmul_precision: str = "highest") -> bool:
    """Settings that only a CUDA run takes (`trainer=gpu` sets them); True if applied.

    matmul_precision is torch.set_float32_matmul_precision's: "high" lets the float32 matmuls
    that mixed precision leaves (and every matmul of a 32-true run) use TF32 tensor cores, with a
    10-bit mantissa instead of 23. On a CPU the setting would let oneDNN use bf16, which is not
    what a CPU run asked for, so it is left alone there.
    """
    if matmul_precision not in MATMUL_PRECISIONS:
        raise ConfigError(
            f"trainer.matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}; "
            f"got {matmul_precision!r}"
        )
    from lightning.pytorch.accelerators import CUDAAccelerator

    if not isinstance(trainer.accelerator, CUDAAccelerator):
        return False
    import torch

    torch.set_float32_matmul_precision(matmul_precision)
    return True


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path, resume: str = "never") -> str | None:
    """The checkpoint to resume from: `ckpt_path` (a path, or `last`: this run directory's
    last.ckpt), else with `resume=auto` the run directory's last.ckpt when there is one."""
    if resume not in ("auto", "never"):
        raise ConfigError(f"resume must be auto or never; got {resume!r}")
    last = run_dir / "checkpoints" / "last.ckpt"
    if ckpt_path in (None, ""):
        if resume == "auto" and last.is_file():
            return str(last)
        if resume == "auto":
            log.info("resume=auto: no %s yet, starting afresh", last)
        return None
    if ckpt_path == "last":
        if not last.is_file():
            raise CheckpointError(
                f"ckpt_path=last: no {last}; resume with hydra.run.dir=<the run's directory> "
                "ckpt_path=last (or resume=auto), or give the checkpoint's path"
            )
        return str(last)
    if not Path(ckpt_path).is_file():
        raise CheckpointError(f"checkpoint not found: {ckpt_path}")
    return str(ckpt_path)
