"""Shared fixtures: compose the real Hydra configs into tmp_path, locate ../shared."""

import os
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
