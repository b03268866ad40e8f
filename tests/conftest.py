"""Shared fixtures: compose the real Hydra configs into tmp_path, locate ../shared."""

import os
import shutil
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED = ROOT.parent / "shared"

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def compose_cfg(
    name: str = "train",
    overrides: list[str] | None = None,
    out: Path | None = None,
    cache: Path | None = None,
):
    """The config a user's command line would produce, with outputs under `out`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides or [], return_hydra_config=False)
    with open_dict(cfg):
        if out is not None:
            cfg.paths.output_dir = str(out)
        if cache is not None:
            cfg.paths.cache_dir = str(cache)
    return cfg


def module_and_data(cfg, cache: Path):
    """The LightningModule and DataModule that train.py builds from `cfg` (untrained)."""
    from omegaconf import OmegaConf

    from captioning.training.datamodule import CaptionDataModule
    from captioning.training.lit_module import CaptioningModule

    part = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("data", "encoder", "decoder", "optim", "val_decode", "test_decode")
    }
    dm = CaptionDataModule(part["data"], cache_dir=str(cache)).load()
    module = CaptioningModule(
        encoder=part["encoder"],
        decoder=part["decoder"],
        vocab=dm.vocab.to_dict(),
        optim=part["optim"],
        val_decode=part["val_decode"],
        test_decode=part["test_decode"],
        data_info=dm.info(),
    )
    dm.use_feature_cache(module.model.encoder)
    return module, dm


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One synthetic-data cache shared by the tests of a session (generation is deterministic)."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip("../shared/data is not present")
    return path


def path_without_java(tmp_path: Path) -> str:
    """os.environ's PATH with `java` gone: a folder holding one is replaced by a folder of links
    to its other programs, so everything else (git, compilers) is still found."""
    parts = []
    for i, folder in enumerate(os.environ.get("PATH", "").split(os.pathsep)):
        if not folder or not (Path(folder) / "java").exists():
            parts.append(folder)
            continue
        shadow = tmp_path / f"bin{i}"
        shadow.mkdir()
        for entry in Path(folder).iterdir():
            if entry.name != "java":
                (shadow / entry.name).symlink_to(entry)
        parts.append(str(shadow))
    path = os.pathsep.join(parts)
    assert shutil.which("java", path=path) is None
    return path
