"""Slow tier: real `train.py` / `evaluate.py` subprocesses on the built-in data."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
    captions = json.loads((out / "metrics.json").read_text())["captions"]
    assert captions == pytest.approx(trained["captions"]) and captions["mean_words"] > 0
    report = (out / "report.md").read_text()
    assert "Best captions" in report and "Worst captions" in report
    assert list((out / "report").glob("*.png"))


def test_ddp_two_processes_on_cpu(tmp_path, data_cache):
    proc = run(
        "train.py",
        [*TINY, f"hydra.run.dir={tmp_path}", "trainer.devices=2", "trainer.strategy=ddp"],
        data_cache,
    )
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())["metrics"]
    assert metrics["BLEU-1"] > 0
    # DistributedSampler pads with repeated images; each test image is scored exactly once.
    preds = json.loads((tmp_path / "test_predictions.json").read_text())
    assert len(preds) == 32 == len({p["image_id"] for p in preds})
    # every rank scores the same gathered captions: no advice to average them across ranks
    assert "sync_dist=True" not in proc.stdout + proc.stderr


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


def test_resume_in_a_moved_run_folder(tmp_path, data_cache):
    first, moved = tmp_path / "scratch", tmp_path / "home"
    run(
        "train.py",
        [*TINY, f"hydra.run.dir={first}", "trainer.max_epochs=1", "test=false"],
        data_cache,
    )
    shutil.copytree(first, moved)
    args = [*TINY, f"hydra.run.dir={moved}", "trainer.max_epochs=2", "resume=auto", "test=false"]
    run("train.py", args, data_cache)
    ckpts = moved / "checkpoints"
    # last.ckpt itself moves on (a last-v1.ckpt beside it would leave resume=auto a stale one)
    assert not list(ckpts.glob("last-v*.ckpt")), sorted(p.name for p in ckpts.iterdir())
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 1 and last["global_step"] > 0
    # the first epoch's score still counts: the better of the two epochs is the one best
    # checkpoint kept (save_top_k=1), not the second epoch's beside a forgotten first
    info = json.loads((moved / "run_info.json").read_text())
    first_score = json.loads((first / "run_info.json").read_text())["best_score"]
    assert info["best_score"] >= first_score
    kept = sorted(p.name for p in ckpts.glob("epoch*.ckpt"))
    assert kept == [f"epoch{info['best_epoch']:03d}.ckpt"], kept
