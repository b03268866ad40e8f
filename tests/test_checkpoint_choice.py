"""captioning.checkpoint: which checkpoint caption.py and the app use when none is named."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from captioning.checkpoint import find_checkpoint, locate_checkpoint, newest_checkpoint
from captioning.cli import paths_as_override
from captioning.errors import CheckpointError


def fake_ckpt(path: Path, score: float | None, monitor: str = "val/bleu4", age: float = 0) -> Path:
    """A file with the "captioning" block's selection fields (all find_checkpoint reads)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    metrics = {} if score is None else {monitor: score}
    torch.save({"captioning": {"monitor": monitor, "metrics": metrics}, "state_dict": {}}, path)
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def complete(run: Path, how: str = "test", age: float = 0) -> None:
    run.mkdir(parents=True, exist_ok=True)
    marker = run / ("test_metrics.json" if how == "test" else "run_info.json")
    marker.write_text(json.dumps({"status": "completed"} if how == "info" else {}))
    t = time.time() - age
    os.utime(marker, (t, t))


def test_best_checkpoint_of_the_newest_completed_run(tmp_path):
    old, new, unfinished = tmp_path / "old", tmp_path / "new", tmp_path / "unfinished"
    fake_ckpt(old / "checkpoints" / "epoch005.ckpt", 0.9, age=300)
    complete(old, age=300)
    fake_ckpt(new / "checkpoints" / "epoch001.ckpt", 0.40, age=100)
    fake_ckpt(new / "checkpoints" / "epoch002.ckpt", 0.45, age=90)
    fake_ckpt(new / "checkpoints" / "last.ckpt", 0.45, age=80)  # a tie: the numbered one wins
    complete(new, how="info", age=60)  # test=false: run_info.json says completed
    fake_ckpt(unfinished / "checkpoints" / "last.ckpt", 0.01, age=0)
    (unfinished / "run_info.json").write_text(json.dumps({"status": "running"}))

    found = find_checkpoint(tmp_path)
    assert found.path == new / "checkpoints" / "epoch002.ckpt"
    assert found.monitor == "val/bleu4" and found.score == pytest.approx(0.45)
    assert found.completed and found.run_dir == new
    assert "val/bleu4 0.4500" in found.describe() and "newest completed run" in found.describe()
    assert newest_checkpoint(tmp_path) == unfinished / "checkpoints" / "last.ckpt"


def test_a_debug_fast_run_is_not_a_model(tmp_path):
    real, smoke = tmp_path / "real", tmp_path / "smoke"
    fake_ckpt(real / "checkpoints" / "epoch003.ckpt", 0.8, age=100)
    complete(real, age=100)
    fake_ckpt(smoke / "checkpoints" / "last.ckpt", 0.0)
    complete(smoke)  # newer and completed, but one batch of each split
    (smoke / ".hydra").mkdir()
    (smoke / ".hydra" / "config.yaml").write_text("trainer:\n  fast_dev_run: true\n")
    assert find_checkpoint(tmp_path).path == real / "checkpoints" / "epoch003.ckpt"
    shutil.rmtree(real)
    assert find_checkpoint(tmp_path).path == smoke / "checkpoints" / "last.ckpt"  # all there is


def test_cider_runs_and_unscored_files(tmp_path):
    run = tmp_path / "run"
    fake_ckpt(run / "checkpoints" / "epoch000.ckpt", 2.1, monitor="val/cider", age=20)
    fake_ckpt(run / "checkpoints" / "epoch003.ckpt", 2.6, monitor="val/cider", age=10)
    (run / "checkpoints" / "broken.ckpt").write_bytes(b"not a checkpoint")
    complete(run)
    found = find_checkpoint(tmp_path)
    assert found.path.name == "epoch003.ckpt" and found.monitor == "val/cider"


def test_without_a_completed_run_the_newest_run_is_used_and_said_so(tmp_path):
    fake_ckpt(tmp_path / "a" / "checkpoints" / "last.ckpt", None, age=100)
    fake_ckpt(tmp_path / "b" / "checkpoints" / "last.ckpt", None, age=0)
    found = find_checkpoint(tmp_path)
    assert found.path == tmp_path / "b" / "checkpoints" / "last.ckpt" and not found.completed
    assert "may still be training" in found.describe()


def test_nothing_found_and_named_paths(tmp_path):
    assert find_checkpoint(tmp_path / "absent") is None and find_checkpoint(tmp_path) is None
    with pytest.raises(CheckpointError, match="no checkpoint given"):
        locate_checkpoint(None, tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        locate_checkpoint(tmp_path / "x.ckpt", tmp_path)
    p = fake_ckpt(tmp_path / "x.ckpt", 0.3)
    found = locate_checkpoint(str(p), tmp_path)
    assert found.path == p and found.score == pytest.approx(0.3)


def test_checkpoint_module_imports_neither_lightning_nor_hydra():
    code = (
        "import sys, captioning.checkpoint; "
        "print([m for m in ('lightning', 'hydra') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["a.jpg", "b.png"], ["images=['a.jpg','b.png']"]),
        (
            ["a.jpg", "decode.beam_size=2", "b.jpg", "--cfg", "job"],
            ["images=['a.jpg','b.jpg']", "decode.beam_size=2", "--cfg", "job"],
        ),
        (["-m", "decode.beam_size=1,3", "dir/"], ["-m", "decode.beam_size=1,3", "images=['dir/']"]),
        (["--info", "defaults", "a.jpg"], ["--info", "defaults", "images=['a.jpg']"]),
        (["-cn", "caption", "a.jpg"], ["-cn", "caption", "images=['a.jpg']"]),
        (["~figures", "a.jpg"], ["~figures", "images=['a.jpg']"]),
        (["images=[a.jpg]", "figures=false"], ["images=[a.jpg]", "figures=false"]),
    ],
)
def test_plain_paths_become_the_images_override(argv, expected):
    assert paths_as_override(argv) == expected


def test_quoted_paths_read_back_unchanged():
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    paths = ["my photo, 1.jpg", "it's.png", "[1].png", "back\\slash", "end\\", "${x}.png"]
    override = paths_as_override(paths)[-1]
    value = OverridesParser.create().parse_override(override).value()
    assert OmegaConf.to_container(OmegaConf.create({"v": value}), resolve=True)["v"] == paths
