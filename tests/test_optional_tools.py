"""Optional tools (METEOR's Java and pycocoevalcap, W&B): a run without them finishes and says
what it left out; a run that demands a missing one stops before training, with one line."""

import json
import logging
import os
import shutil
import subprocess
import sys

import lightning as L
import pytest

from captioning import meteor as MET
from captioning.cli import run_safely
from captioning.errors import ConfigError, UserError
from captioning.metrics import METRIC_KEYS, score_corpus
from conftest import ROOT, compose_cfg, path_without_java

sys.path.insert(0, str(ROOT))
import evaluate as evaluate_script  # noqa: E402
import train as train_script  # noqa: E402

REAL_WHICH = shutil.which


def no_java(monkeypatch: pytest.MonkeyPatch) -> None:
    """`java` is not on PATH for this process (other programs still are)."""
    monkeypatch.setattr(
        MET.shutil,
        "which",
        lambda cmd, *a, **k: None if cmd == "java" else REAL_WHICH(cmd, *a, **k),
    )
    monkeypatch.setattr(MET, "_noted_skip", False)


@pytest.mark.parametrize(
    ("value", "mode"),
    [("auto", None), (None, None), (True, True), (False, False), ("true", True), ("False", False)],
)
def test_meteor_setting_is_auto_true_or_false(value, mode):
    assert MET.meteor_mode(value) is mode


def test_an_unknown_meteor_setting_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="auto, true or false"):
        MET.meteor_mode("sometimes", "decode.meteor")


def test_auto_without_java_reports_null_and_says_once_how_to_get_it(monkeypatch, caplog):
    no_java(monkeypatch)
    assert not MET.meteor_available()
    with caplog.at_level(logging.WARNING, logger="captioning.meteor"):
        for _ in range(3):  # validation and test score many times: the note comes once
            scores = score_corpus({1: "a dog runs"}, {1: ["a dog is running"]}, meteor="auto")
            assert scores["METEOR"] is None
            assert all(scores[k] is not None for k in METRIC_KEYS if k != "METEOR")
    notes = [r.getMessage() for r in caplog.records if "METEOR" in r.getMessage()]
    assert len(notes) == 1 and "pip install pycocoevalcap" in notes[0] and "Java" in notes[0]
    # skipped on purpose: nothing to say
    caplog.clear()
    monkeypatch.setattr(MET, "_noted_skip", False)
    score_corpus({1: "a dog"}, {1: ["a dog"]}, meteor=False)
    assert not caplog.records


def test_demanded_meteor_without_java_stops_before_training(
    tmp_path, data_cache, monkeypatch, capsys
):
    no_java(monkeypatch)
    fits = []
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: fits.append(a))
    cfg = compose_cfg(
        "train",
        ["debug=tiny", "trainer.accelerator=cpu", "test_decode.meteor=true"],
        out=tmp_path,
        cache=data_cache,
    )
    with pytest.raises(SystemExit) as stop:
        run_safely(train_script.train, cfg)
    assert stop.value.code == 2 and not fits
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: test_decode.meteor=true demands METEOR")
    assert "pip install pycocoevalcap" in err[0] and "test_decode.meteor=auto" in err[0]
    assert not list(tmp_path.rglob("*.ckpt"))
    # without a test step nothing demands it: the same config with test=false reaches fit
    cfg = compose_cfg(
        "train",
        ["debug=tiny", "trainer.accelerator=cpu", "test_decode.meteor=true", "test=false"],
        out=tmp_path,
        cache=data_cache,
    )
    train_script.train(cfg)
    assert len(fits) == 1


def test_evaluate_demanding_meteor_without_java_stops_before_loading(tmp_path, monkeypatch):
    no_java(monkeypatch)
    # the checkpoint does not exist: the METEOR check must come first to be the error seen
    cfg = compose_cfg(
        "evaluate", [f"ckpt_path={tmp_path}/none.ckpt", "decode.meteor=true"], out=tmp_path
    )
    with pytest.raises(UserError, match="decode.meteor=true demands METEOR"):
        evaluate_script.evaluate(cfg)


def test_wandb_logger_without_wandb_stops_before_training(tmp_path, data_cache, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # importlib finds no wandb
    fits = []
    monkeypatch.setattr(L.Trainer, "fit", lambda *a, **k: fits.append(a))
    cfg = compose_cfg(
        "train",
        ["debug=tiny", "trainer.accelerator=cpu", "logger=wandb"],
        out=tmp_path,
        cache=data_cache,
    )
    with pytest.raises(UserError, match="pip install wandb"):
        train_script.train(cfg)
    assert not fits


@pytest.mark.slow
def test_train_without_java_finishes_with_meteor_null(tmp_path):
    env = {
        **os.environ,
        "PATH": path_without_java(tmp_path),
        "CAPTIONING_CACHE": str(tmp_path / "cache"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("JAVA_HOME", None)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "debug=tiny", "trainer.accelerator=cpu",
         "trainer.enable_progress_bar=false", f"hydra.run.dir={run}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    metrics = json.loads((run / "test_metrics.json").read_text())["metrics"]
    assert metrics["METEOR"] is None
    assert all(isinstance(metrics[k], float) for k in METRIC_KEYS if k != "METEOR"), metrics
    # the printed metrics aside ("METEOR": null), one line says METEOR was left out and why
    notes = [line for line in out.splitlines() if "METEOR" in line and '"METEOR"' not in line]
    assert len(notes) == 1, out[-3000:]
    assert "skipped" in notes[0] and "pip install pycocoevalcap" in notes[0]
