"""Slow tier: real `train.py` / `evaluate.py` subprocesses on the built-in data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow

TINY = ["debug=tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]


def run(
    script: str, args: list[str], cache: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    env = {**os.environ, "CAPTIONING_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_train_then_evaluate_matches_training_test(tmp_path, data_cache):
    run("train.py", [*TINY, f"hydra.run.dir={tmp_path}"], data_cache)
    trained = json.loads((tmp_path / "test_metrics.json").read_text())
    out = tmp_path / "eval"
    run("evaluate.py", [f"ckpt_path={trained['checkpoint']}", f"hydra.run.dir={out}"], data_cache)
    evaluated = json.loads((out / "metrics.json").read_text())["metrics"]
    for key in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"):
        assert evaluated[key] == pytest.approx(trained["metrics"][key], abs=1e-9), key
    assert (out / "predictions.json").is_file() and (out / "per_image_scores.json").is_file()
    report = (out / "report.md").read_text()
    assert "Best captions" in report and "Worst captions" in report
    assert list((out / "report").glob("*.png"))


def test_ddp_two_processes_on_cpu(tmp_path, data_cache):
    run(
        "train.py",
        [*TINY, f"hydra.run.dir={tmp_path}", "trainer.devices=2", "trainer.strategy=ddp"],
        data_cache,
    )
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())["metrics"]
    assert metrics["BLEU-1"] > 0
    # DistributedSampler pads with repeated images; each test image is scored exactly once.
    preds = json.loads((tmp_path / "test_predictions.json").read_text())
    assert len(preds) == 32 == len({p["image_id"] for p in preds})


def test_resume_from_last_checkpoint(tmp_path, data_cache):
    run(
        "train.py",
        [*TINY, f"hydra.run.dir={tmp_path}", "trainer.max_epochs=1", "test=false"],
        data_cache,
    )
    run(
        "train.py",
        [
            *TINY,
            f"hydra.run.dir={tmp_path}",
            "trainer.max_epochs=2",
            "ckpt_path=last",
            "test=false",
        ],
        data_cache,
    )
    rows = (tmp_path / "csv" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    epochs = {
        r.split(",")[header.index("epoch")]
        for r in rows[1:]
        if r.split(",")[header.index("val/bleu4")]
    }
    assert epochs == {"0", "1"}, rows
