"""Sweeps and tracking: run_info.json, the W&B caption table, the sweep configs, a real multirun."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import OmegaConf

from captioning.training import wandb_log as cb
from captioning.training.callbacks import RunInfo
from captioning.training.wandb_offline import read_offline_run
from conftest import CONF, ROOT, compose_cfg, module_and_data

TINY_DATA = ["data.args.num_train=32", "data.args.num_val=16", "data.args.num_test=16"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """An untrained module and the validation split of a tiny synthetic data set."""
    cache = tmp_path_factory.mktemp("cache")
    cfg = compose_cfg("train", ["debug=tiny", *TINY_DATA], out=cache, cache=cache)
    module, dm = module_and_data(cfg, cache)
    return module.eval(), dm


def test_caption_examples_from_images(tiny_model):
    module, dm = tiny_model
    ds = dm.dataset("val")
    examples = cb.caption_examples(module, ds, range(3), tile=32)
    assert [e.image_id for e in examples] == ds.image_ids[:3]
    assert [e.refs for e in examples] == ds.refs[:3]
    for e in examples:  # the image, then one tile per word, 5 tiles a row
        assert e.attention.width == 5 * 32 and e.attention.height >= 32
        assert e.image.size == (64, 64)


def test_caption_examples_from_cached_features(tiny_model, monkeypatch):
    """With a frozen encoder's cached features the model never sees pixels; captions agree."""
    module, dm = tiny_model
    ds = dm.dataset("val")
    expected = [e.caption for e in cb.caption_examples(module, ds, range(4))]
    with torch.no_grad():
        feats = module.model.encode(torch.stack([ds.image_tensor(i) for i in range(len(ds))]))
    monkeypatch.setattr(ds, "features", feats.numpy().astype(np.float32))  # (M, N, D)
    monkeypatch.setattr(ds, "image_tensor", lambda i: pytest.fail("decoded pixels for the model"))
    examples = cb.caption_examples(module, ds, range(4))
    assert [e.caption for e in examples] == expected
    assert all(e.image.size == (64, 64) for e in examples)  # still shown from the image file


def test_table_rows_build_a_wandb_table_offline(tiny_model):
    wandb = pytest.importorskip("wandb")
    module, dm = tiny_model
    examples = cb.caption_examples(module, dm.dataset("val"), range(2))
    table = wandb.Table(columns=cb.TABLE_COLUMNS, data=cb.table_rows(examples, 3, wandb))
    assert len(table.data) == 2 and table.data[0][0] == 3
    assert isinstance(table.data[0][2], wandb.Image) and isinstance(table.data[0][5], wandb.Image)
    assert "\n" in table.data[0][4]  # every reference, one per line


def fake_trainer(dm, loggers, **kw):
    defaults = {
        "sanity_checking": False,
        "is_global_zero": True,
        "current_epoch": 0,
        "global_step": 7,
        "loggers": loggers,
        "datamodule": dm,
    }
    return SimpleNamespace(**{**defaults, **kw})


def test_caption_table_logs_only_with_a_wandb_logger(tiny_model, tmp_path, monkeypatch):
    module, dm = tiny_model
    callback = cb.WandbCaptionTable(num_images=3)
    monkeypatch.setattr(cb, "caption_examples", lambda *a, **k: pytest.fail("captioned"))
    callback.on_validation_epoch_end(fake_trainer(dm, [CSVLogger(tmp_path)]), module)
    monkeypatch.undo()

    logged = {}
    wandb_logger = WandbLogger(save_dir=tmp_path, offline=True)  # no run until .experiment
    monkeypatch.setattr(wandb_logger, "log_table", lambda **kw: logged.update(kw))
    callback.on_validation_epoch_end(fake_trainer(dm, [CSVLogger(tmp_path), wandb_logger]), module)
    assert logged["key"] == "val/captions" and logged["columns"] == cb.TABLE_COLUMNS
    assert len(logged["data"]) == 3 and logged["step"] == 7
    assert wandb_logger._experiment is None  # nothing started a W&B run

    logged.clear()  # other ranks leave it to rank 0
    callback.on_validation_epoch_end(fake_trainer(dm, [wandb_logger], is_global_zero=False), module)
    assert not logged


def test_run_info_tracks_the_best_epoch_and_the_outcome(tmp_path):
    ckpt = SimpleNamespace(monitor="val/bleu4", mode="max")
    trainer = SimpleNamespace(
        sanity_checking=False,
        is_global_zero=True,
        checkpoint_callback=ckpt,
        default_root_dir=str(tmp_path),
        current_epoch=0,
        global_step=0,
        callback_metrics={},
        loggers=[],
    )
    module = torch.nn.Linear(3, 2)
    info = RunInfo()
    info.on_fit_start(trainer, module)
    assert json.loads((tmp_path / "run_info.json").read_text())["status"] == "running"
    for epoch, score in enumerate([0.1, 0.3, 0.3, float("nan"), 0.2]):
        trainer.current_epoch = epoch
        trainer.callback_metrics = {"val/bleu4": torch.tensor(score)}
        info.on_validation_end(trainer, module)
    info.on_fit_end(trainer, module)
    out = json.loads((tmp_path / "run_info.json").read_text())
    assert out["status"] == "completed" and out["params"] == 8 and out["trainable_params"] == 8
    assert out["best_epoch"] == 1 and out["best_score"] == pytest.approx(0.3)
    assert out["train_time_s"] >= 0 and out["monitor"] == "val/bleu4"

    resumed = RunInfo(path=str(tmp_path / "resumed.json"))  # state travels in checkpoints
    resumed.load_state_dict({**info.state_dict(), "train_time_s": 100.0})
    resumed.on_exception(trainer, module, RuntimeError("out of memory"))
    out = json.loads((tmp_path / "resumed.json").read_text())
    assert out["status"] == "failed" and "out of memory" in out["error"]
    assert out["best_epoch"] == 1 and out["train_time_s"] >= 100.0


def test_wandb_logger_outside_hydra_keeps_what_it_is_given(tmp_path):
    logger = cb.wandb_logger(project="p", save_dir=str(tmp_path), group="g", offline=True)
    assert isinstance(logger, WandbLogger)
    assert logger._wandb_init["group"] == "g" and logger._wandb_init["config"] is None
    assert logger._experiment is None


def test_wandb_logger_config_instantiates(tmp_path):
    from captioning.cli import instantiate_all

    cfg = compose_cfg(
        "train",
        ["logger=wandb", "debug=tiny", "trainer.accelerator=cpu"],
        out=tmp_path,
        cache=tmp_path,
    )
    trainer, _ = instantiate_all(cfg)
    assert [type(lg) for lg in trainer.loggers] == [CSVLogger, WandbLogger]  # the CSV log stays
    assert trainer.loggers[1]._wandb_init["dir"] == str(tmp_path)


def no_wandb_account(monkeypatch, tmp_path: Path) -> None:
    """A machine where nobody ran `wandb login`: no key anywhere W&B would look."""
    for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))


def test_wandb_without_an_account_goes_offline_and_says_so(tmp_path, monkeypatch, caplog):
    from captioning.cli import instantiate_all

    no_wandb_account(monkeypatch, tmp_path)
    assert not cb.wandb_api_key_found()
    cfg = compose_cfg("train", ["logger=wandb"], out=tmp_path / "run", cache=tmp_path)
    with caplog.at_level("WARNING", logger="captioning.training.wandb_log"):
        trainer, _ = instantiate_all(cfg)
    csv_logger, wandb_logger = trainer.loggers
    assert isinstance(csv_logger, CSVLogger) and wandb_logger._offline
    (line,) = [r.getMessage() for r in caplog.records if "W&B" in r.getMessage()]
    assert "offline" in line and f"wandb sync {tmp_path / 'run'}/wandb/offline-run-*" in line


def test_wandb_with_a_key_or_a_mode_is_left_as_configured(tmp_path, monkeypatch, caplog):
    no_wandb_account(monkeypatch, tmp_path)
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / ".netrc").write_text(
        "machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n"
    )
    (home / ".netrc").chmod(0o600)
    assert cb.wandb_api_key_found()
    assert not cb.wandb_logger(project="p", save_dir=str(tmp_path))._offline
    (home / ".netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert not cb.wandb_logger(project="p", save_dir=str(tmp_path))._offline
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.setenv("WANDB_MODE", "offline")  # W&B's own switch: nothing to say
    with caplog.at_level("WARNING", logger="captioning.training.wandb_log"):
        cb.wandb_logger(project="p", save_dir=str(tmp_path))
    assert not [r for r in caplog.records if "W&B" in r.getMessage()]


def compose_with_hydra(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


def test_grid_search_config_composes():
    cfg = compose_with_hydra(["hparams_search=grid"])
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert set(cfg.hydra.sweeper.params) == {"decoder.attention_dim", "decoder.hidden_dim"}


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = compose_with_hydra(["hparams_search=optuna", "seed=3"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == 3
    assert "optim.decoder_lr" in sweeper.params and cfg.hydra.mode.name == "MULTIRUN"


def test_caption_examples_follow_the_weights_dtype(tiny_model):
    """Under bf16-true precision the inputs are cast like validation batches are."""
    import copy

    module, dm = tiny_model
    half = copy.deepcopy(module).to(torch.bfloat16)
    examples = cb.caption_examples(half, dm.dataset("val"), range(2))
    assert len(examples) == 2 and all(isinstance(e.caption, str) for e in examples)


# -- slow: real multiruns ------------------------------------------------------------------------
FAST_RUN = [
    "debug=tiny",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "test_decode.meteor=false",
    "test_decode.beam_size=1",
    "trainer.limit_train_batches=3",
    *TINY_DATA,
]


def run_sweep(args: list[str], tmp_path: Path, cache: Path) -> subprocess.CompletedProcess:
    wandb_home = tmp_path / "wandb-home"  # W&B's staging/cache/settings, out of the user's home
    env = {
        **os.environ,
        "CAPTIONING_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "WANDB_DATA_DIR": str(wandb_home / "data"),
        "WANDB_CACHE_DIR": str(wandb_home / "cache"),
        "WANDB_CONFIG_DIR": str(wandb_home / "config"),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("WANDB_API_KEY", None)
    # No stdin: a login prompt would fail the run instead of hanging it; the timeout catches a
    # network wait.
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_multirun_with_wandb_offline_then_report(tmp_path, data_cache):
    sweep = tmp_path / "sweep"
    run_sweep(
        [
            "-m",
            *FAST_RUN,
            "logger=wandb",
            "callbacks.caption_table.num_images=4",
            "decoder.hidden_dim=32,64",
            "decoder.attention_dim=16,32",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_cache,
    )
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    names = set()
    for job in jobs:
        assert (job / "test_metrics.json").is_file()
        info = json.loads((job / "run_info.json").read_text())
        assert info["status"] == "completed" and info["params"] > 0 and info["best_epoch"] in (0, 1)
        run = info["wandb_run"]
        assert run["group"] == "sweep"  # one W&B group per multirun directory
        names.add(run["name"])
        (run_dir,) = (job / "wandb").glob("offline-run-*")  # its own run, in its own directory
        tables = sorted((run_dir / "files" / "media" / "table" / "val").glob("captions_*.json"))
        assert len(tables) == 2  # one per validation epoch
        table = json.loads(tables[-1].read_text())
        assert table["columns"] == cb.TABLE_COLUMNS and len(table["data"]) == 4
        assert b"val/captions" in next(run_dir.glob("run-*.wandb")).read_bytes()
        # What `wandb sync` would upload, read back: the resolved config, the metrics of every
        # validation, the test scores in the summary.
        logged = read_offline_run(run_dir)
        assert logged.group == "sweep" and logged.name == run["name"]
        resolved = OmegaConf.to_container(OmegaConf.load(job / ".hydra" / "config.yaml"))
        for group in ("decoder", "encoder", "optim", "data"):
            assert logged.config[group] == resolved[group], group
        for key in ("val/bleu1", "val/bleu4", "val/cider", "val/loss"):
            assert len(logged.series(key)) == 2, key  # two epochs
        expected = json.loads((job / "test_metrics.json").read_text())["metrics"]
        assert logged.summary["test/bleu4"] == pytest.approx(expected["BLEU-4"])
        assert logged.summary["test/cider"] == pytest.approx(expected["CIDEr"])
    assert names == {
        f"decoder.hidden_dim={h},decoder.attention_dim={a}" for h in (32, 64) for a in (16, 32)
    }

    proc = subprocess.run(
        [sys.executable, "-m", "captioning.report", str(sweep)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4 and {r["status"] for r in rows} <= {"ok", "degenerate"}
    assert {(r["decoder.hidden_dim"], r["decoder.attention_dim"]) for r in rows} == {
        ("32", "16"),
        ("32", "32"),
        ("64", "16"),
        ("64", "32"),
    }
    assert all(r["val_bleu1"] and r["test_cider"] and r["params"] for r in rows)
    assert (sweep / "report.png").stat().st_size > 10_000


@pytest.mark.slow
def test_optuna_study_gets_the_selection_metric(tmp_path, data_cache):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "study"
    run_sweep(
        [
            "hparams_search=optuna",
            *FAST_RUN,
            "trainer.max_epochs=1",
            "hydra.sweeper.n_trials=2",
            "decoder.hidden_dim=choice(32,64)",
            "decoder.attention_dim=16",
            "decoder.dropout=0.0",
            "optim.decoder_lr=interval(0.0005,0.002)",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
        data_cache,
    )
    results = OmegaConf.load(sweep / "optimization_results.yaml")
    best = max(
        json.loads((sweep / j / "run_info.json").read_text())["best_score"] for j in ("0", "1")
    )
    assert results.best_value == pytest.approx(best)  # what train() returned reached Optuna
    assert set(results.best_params) == {"decoder.hidden_dim", "optim.decoder_lr"}
    rows = list(csv.DictReader((sweep / "report.csv").open()))  # SweepReport, at the study's end
    assert [r["job"] for r in rows] == ["0", "1"] and "optim.decoder_lr" in rows[0]


@pytest.mark.slow
def test_a_run_with_wandb_and_no_account_logs_offline_beside_csv(tmp_path, data_cache):
    home = tmp_path / "home"
    env = {
        **os.environ,
        "CAPTIONING_CACHE": str(data_cache),
        "HOME": str(home),  # no ~/.netrc, no wandb settings: nobody logged in
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_CONFIG_DIR": str(home / ".config" / "wandb"),
        "WANDB_CACHE_DIR": str(home / ".cache" / "wandb"),
        "WANDB_DATA_DIR": str(home / "data"),
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        env.pop(var, None)
    run = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *FAST_RUN, "logger=wandb", f"hydra.run.dir={run}"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,  # a login prompt would fail the run, not hang it
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Traceback" not in out and "UsageError" not in out
    lines = [line for line in out.splitlines() if "W&B: no API key" in line]
    assert len(lines) == 1 and f"wandb sync {run}/wandb/offline-run-*" in lines[0]
    assert list((run / "wandb").glob("offline-run-*"))
    assert (run / "csv" / "metrics.csv").is_file()  # the CSV log is kept beside W&B's


@pytest.mark.slow
def test_a_resumed_run_logs_on_into_its_wandb_run(tmp_path, data_cache):
    """Interrupted after epoch 1 and resumed: one W&B run (one id) holds both epochs."""
    run = tmp_path / "run"
    common = [*FAST_RUN, "logger=wandb", f"hydra.run.dir={run}", "test=false"]
    run_sweep([*common, "trainer.max_epochs=1"], tmp_path, data_cache)
    run_sweep([*common, "trainer.max_epochs=2", "resume=auto"], tmp_path, data_cache)
    first, second = sorted((run / "wandb").glob("offline-run-*"))  # one folder per process
    a, b = read_offline_run(first), read_offline_run(second)
    assert a.id == b.id  # `wandb sync` of both uploads one run
    assert json.loads((run / "run_info.json").read_text())["wandb_run"]["id"] == a.id
    assert a.series("epoch")[-1] == 0 and b.series("epoch")[-1] == 1
    assert len(a.series("val/bleu4")) == 1 and len(b.series("val/bleu4")) == 1
