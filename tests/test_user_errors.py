"""User mistakes fail at once with one clear message that says what is valid; no traceback."""

import os
import subprocess
import sys

import pytest

from conftest import ROOT


def train(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTIONING_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={tmp_path}/run", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["encoder=resnet1001"], ["resnet101", "efficientnet_lite0", "small_cnn"]),
        (["decoder=transformer"], ["soft_attention", "show_tell", "merge"]),
        (["encoder.fine_tune=some"], ["none", "top", "all"]),
        (["monitor=val/meteor"], ["val/bleu4", "val/cider"]),
        (["optim.scheduler=linear"], ["none", "cosine", "plateau"]),
        (["debug=tiny", "scst={baseline: max}", "init_from=x.ckpt"], ["greedy", "mean"]),
        (["debug=tiny", "scst={samples: 5}"], ["init_from="]),
    ],
    ids=["encoder", "decoder", "fine_tune", "monitor", "scheduler", "scst", "scst_init"],
)
def test_invalid_choice_lists_valid_ones(args, expected, tmp_path):
    proc = train(*args, tmp_path=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for choice in expected:
        assert choice in proc.stderr, proc.stderr[-2000:]


def test_missing_dataset_says_what_and_how(tmp_path):
    proc = train("experiment=flickr8k", f"data.args.root={tmp_path}/nowhere", tmp_path=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "nowhere" in proc.stderr and "kaggle.com" in proc.stderr.lower(), proc.stderr[-2000:]
