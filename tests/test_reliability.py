"""Kill and resume, numerical faults, data faults, unwritable checkpoint folders (issue #8).

The slow tier kills real `train.py` processes (SIGKILL, SIGTERM, SIGINT, at chosen points and at
an arbitrary moment), resumes them, and requires exactly the uninterrupted run's results: the
same validation history, test metrics and final weights, bit for bit.
"""

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from test_checkpoints import assert_plain

from conftest import CONF, ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

TINY = ["debug=tiny", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
# 32 images x 5 captions / 16 = 10 batches an epoch; dropout on, so the global RNG matters too.
EXACT = [
    *TINY,
    "data.args.num_train=32",
    "trainer.max_epochs=3",
    "optim.warmup_steps=0",
    "optim.decoder_lr=3e-3",
    "optim.encoder_lr=3e-3",
    "decoder.dropout=0.3",
    "test_decode.meteor=false",
]
BATCHES = 10


class SendSignal(L.Callback):
    """Test-only fault injection: the process signals itself when a given batch starts.

    Loaded into `train.py` by Hydra (`+callbacks.kill._target_=test_reliability.SendSignal`).
    `batch=-1` fires at the start of that epoch's validation instead, `batch=-2` at the start of
    testing (after training).
    """

    def __init__(self, sig: str, epoch: int, batch: int):
        self.sig, self.epoch, self.batch = getattr(signal, sig), epoch, batch

    def _fire(self, trainer: L.Trainer, batch: int) -> None:
        if trainer.current_epoch == self.epoch and batch == self.batch:
            os.kill(os.getpid(), self.sig)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._fire(trainer, batch_idx)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and not trainer.sanity_checking:
            self._fire(trainer, -1)

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == 0 and self.batch == -2:
            os.kill(os.getpid(), self.sig)


def kill_at(sig: str, epoch: int, batch: int) -> list[str]:
    return [
        "+callbacks.kill._target_=test_reliability.SendSignal",
        f"+callbacks.kill.sig={sig}",
        f"+callbacks.kill.epoch={epoch}",
        f"+callbacks.kill.batch={batch}",
    ]


def env(cache: Path) -> dict[str, str]:
    return {
        **os.environ,
        "CAPTIONING_CACHE": str(cache),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }


def train_proc(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def outcome(run_dir: Path) -> dict:
    """What must not change: validation history, test metrics, final weights."""
    rows = list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))
    history: dict[int, set] = {}
    for r in rows:
        if r.get("val/bleu4"):
            history.setdefault(int(r["epoch"]), set()).add(
                (r["val/bleu4"], r["val/loss"], r["val/bleu4_best"])
            )
    test = json.loads((run_dir / "test_metrics.json").read_text())
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return {
        "history": history,
        "test": test["metrics"],
        "best": Path(test["checkpoint"]).name,
        "weights": ckpt["state_dict"],
        "global_step": ckpt["global_step"],
    }


def assert_same(resumed: dict, base: dict) -> None:
    # A killed run may have logged an epoch that its successor repeats: every copy must agree.
    assert resumed["history"] == base["history"], (resumed["history"], base["history"])
    assert resumed["test"] == base["test"]
    assert resumed["best"] == base["best"]
    assert resumed["global_step"] == base["global_step"]
    for k, v in base["weights"].items():
        assert torch.equal(resumed["weights"][k], v), k


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, data_cache) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = train_proc([*EXACT, f"hydra.run.dir={run_dir}"], data_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outcome(run_dir)


# Each scenario: the interruptions of successive runs, then a final run that finishes.
SCENARIOS = {
    "sigkill_after_epoch_0": [("SIGKILL", 1, 0)],
    "sigterm_mid_epoch_then_sigint_mid_same_epoch": [("SIGTERM", 1, 3), ("SIGINT", 1, 7)],
    "sigint_on_last_batch": [("SIGINT", 0, BATCHES - 1)],
    "sigterm_during_validation": [("SIGTERM", 1, -1)],
    "sigkill_mid_epoch": [("SIGKILL", 2, 5)],
}
EXIT = {"SIGKILL": -signal.SIGKILL, "SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT}


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIOS, ids=str)
def test_kill_and_resume_matches_uninterrupted_run(scenario, baseline, tmp_path, data_cache):
    run = [*EXACT, f"hydra.run.dir={tmp_path}"]
    for i, (sig, epoch, batch) in enumerate(SCENARIOS[scenario]):
        resume = ["resume=auto"] if i else []
        proc = train_proc([*run, *resume, *kill_at(sig, epoch, batch)], data_cache)
        assert proc.returncode == EXIT[sig], proc.stderr[-3000:]
        if sig != "SIGKILL":  # one line that says where the checkpoint is and how to resume
            last = proc.stderr.strip().splitlines()[-1]  # epochs counted from 1, as the log does
            assert last.startswith(f"error: {sig}: stopped ") and f"epoch {epoch + 1}" in last, last
            assert "saved" in last and "resume=auto" in last and "Traceback" not in proc.stderr
    # The first scenario resumes the documented way, the others through resume=auto.
    again = ["ckpt_path=last"] if scenario == "sigkill_after_epoch_0" else ["resume=auto"]
    proc = train_proc([*run, *again], data_cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same(outcome(tmp_path), baseline)


@pytest.mark.slow
def test_early_stopped_run_killed_before_testing_does_not_train_on(tmp_path, data_cache):
    """Early stopping fired after epoch 1 of 3 (val/loss watched in mode max, so it stops at the
    first epoch where the loss falls); killed while testing, the resumed run only tests. Resumed
    once more without early stopping, it trains on."""
    stop = [
        *EXACT,
        "callbacks.early_stopping.monitor=val/loss",
        "callbacks.early_stopping.patience=1",
    ]
    base_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "killed"
    assert train_proc([*stop, f"hydra.run.dir={base_dir}"], data_cache).returncode == 0
    base = outcome(base_dir)
    assert base["global_step"] == 2 * BATCHES  # the premise: it stopped early
    run = [*stop, f"hydra.run.dir={run_dir}"]
    assert train_proc([*run, *kill_at("SIGKILL", 1, -2)], data_cache).returncode == -signal.SIGKILL
    assert train_proc([*run, "resume=auto"], data_cache).returncode == 0
    assert_same(outcome(run_dir), base)
    # Resumed without early stopping, the finished run trains on to max_epochs.
    go_on = [*run, "resume=auto", "callbacks.early_stopping=null", "test=false"]
    assert train_proc(go_on, data_cache).returncode == 0
    assert outcome(run_dir)["global_step"] == 3 * BATCHES


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_moment_then_resume(baseline, tmp_path, data_cache):
    """The test, not the run, picks the moment: 1.5 s after the first checkpoint appears."""
    run = [sys.executable, str(ROOT / "train.py"), *EXACT, f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(
        run, cwd=ROOT, env=env(data_cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(1.5)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    done = train_proc([*run[2:], "resume=auto"], data_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same(outcome(tmp_path), baseline)


# -- auto-resume ----------------------------------------------------------------------------
def test_resolve_ckpt_path(tmp_path):
    from captioning.cli import resolve_ckpt_path
    from captioning.errors import CheckpointError, ConfigError

    assert resolve_ckpt_path(None, tmp_path, "auto") is None  # nothing yet: start afresh
    assert resolve_ckpt_path(None, tmp_path, "never") is None
    with pytest.raises(CheckpointError, match="ckpt_path=last: no"):
        resolve_ckpt_path("last", tmp_path)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir()
    last.write_bytes(b"x")
    assert resolve_ckpt_path(None, tmp_path, "auto") == str(last)
    assert resolve_ckpt_path(None, tmp_path, "never") is None
    assert resolve_ckpt_path("last", tmp_path) == str(last)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    assert resolve_ckpt_path(str(other), tmp_path, "auto") == str(other)  # explicit wins
    with pytest.raises(ConfigError):
        resolve_ckpt_path(None, tmp_path, "sometimes")


def test_a_moved_run_folder_keeps_its_best_score_and_last_checkpoint(tmp_path):
    from captioning.training.checkpointing import FiniteModelCheckpoint

    old, new = tmp_path / "scratch" / "checkpoints", tmp_path / "home" / "checkpoints"
    new.mkdir(parents=True)
    for name in ("epoch003.ckpt", "last.ckpt"):
        (new / name).write_bytes(b"")
    state = {
        "monitor": "val/cider",
        "best_model_score": torch.tensor(0.58),
        "best_model_path": str(old / "epoch003.ckpt"),
        "current_score": torch.tensor(0.57),
        "dirpath": str(old),
        "best_k_models": {str(old / "epoch003.ckpt"): torch.tensor(0.58)},
        "kth_best_model_path": str(old / "epoch003.ckpt"),
        "kth_value": torch.tensor(0.58),
        "last_model_path": str(old / "last.ckpt"),
    }
    cb = FiniteModelCheckpoint(dirpath=new, monitor="val/cider", mode="max", save_last=True)
    cb.load_state_dict(dict(state))
    # the score so far still counts, and last.ckpt is the file to overwrite (not last-v1.ckpt)
    assert float(cb.best_model_score) == pytest.approx(0.58)
    assert cb.best_model_path == str(new / "epoch003.ckpt")
    assert cb.last_model_path == str(new / "last.ckpt")
    assert list(cb.best_k_models) == [str(new / "epoch003.ckpt")]

    # only last.ckpt copied: the best file is not there to be tested, so Lightning's own
    # fallback (a fresh best) stands rather than a path that does not exist
    (new / "epoch003.ckpt").unlink()
    cb = FiniteModelCheckpoint(dirpath=new, monitor="val/cider", mode="max", save_last=True)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        cb.load_state_dict(dict(state))
    assert cb.best_model_score is None and cb.best_k_models == {}


def test_resume_state_is_plain_and_round_trips():
    """RNG states go into the checkpoint as plain values and come back exactly."""
    import random

    import numpy as np

    from captioning.training.resume import rng_state, set_rng_state

    state = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]
    assert_plain(state)


# -- numerical faults -----------------------------------------------------------------------
# In-process runs: 16 images x 5 captions / 16 = 5 batches an epoch.
SMALL = [
    *TINY,
    "data.args.num_train=16",
    "data.args.num_val=8",
    "data.args.num_test=8",
    "test_decode.meteor=false",
]


def tiny(tmp_path: Path, cache: Path, *extra: str):
    torch.set_num_threads(1)  # two shared cores
    return compose_cfg("train", [*SMALL, *extra], out=tmp_path, cache=cache)


def weights_and_history(run_dir: Path) -> tuple[dict, dict]:
    """What an in-process run leaves: last.ckpt's weights and step, the validation history."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    history = {
        r["epoch"]: (r["val/bleu4"], r["val/loss"])
        for r in csv.DictReader((run_dir / "csv" / "metrics.csv").open())
        if r.get("val/bleu4")
    }
    return {**ckpt["state_dict"], "global_step": ckpt["global_step"]}, history


def test_flip_resumed_mid_epoch_matches_uninterrupted_run(tmp_path, data_cache):
    """data.flip draws each sample's view from the generator that shuffles, which ResumeState
    saves: a run stopped by SIGTERM in the middle of epoch 1 and resumed trains on the same
    views as a run never stopped, bit for bit (in-process, from cached features)."""
    from captioning.training.guards import TrainingInterrupted

    flip = ["data.flip=true", "encoder.fine_tune=none", "test=false"]
    train_script.train(tiny(tmp_path / "base", data_cache, *flip))
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted):
        train_script.train(tiny(run, data_cache, *flip, *kill_at("SIGTERM", 1, 2)))
    resume = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert resume["callbacks"]["ResumeState"]["mid_epoch"]  # the premise: stopped mid-epoch
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_script.train(tiny(run, data_cache, *flip, "resume=auto"))
    # resuming writes on into the run's own folders: no warning that they are not empty
    assert not [str(w.message) for w in caught if "exists and is not empty" in str(w.message)]
    (weights, history), (base_weights, base_history) = (
        weights_and_history(run),
        weights_and_history(tmp_path / "base"),
    )
    assert history == base_history and len(history) == 2
    assert weights.keys() == base_weights.keys()
    for k, v in base_weights.items():
        assert torch.equal(torch.as_tensor(weights[k]), torch.as_tensor(v)), k


def test_a_run_stopped_before_its_first_epoch_ended_keeps_one_last_checkpoint(tmp_path, data_cache):
    """SIGTERM in the first epoch saves last.ckpt before any epoch-end checkpoint has named it.
    The resumed run's epoch-end saves must overwrite that file, not go to last-v1.ckpt beside
    it: resume=auto reads last.ckpt, so after a later kill it would resume from the older one."""
    from captioning.training.guards import TrainingInterrupted

    run, args = tmp_path / "run", ["encoder.fine_tune=none", "test=false"]
    with pytest.raises(TrainingInterrupted):
        train_script.train(tiny(run, data_cache, *args, *kill_at("SIGTERM", 0, 2)))
    train_script.train(tiny(run, data_cache, *args, "resume=auto"))
    names = sorted(p.name for p in (run / "checkpoints").glob("last*.ckpt"))
    assert names == ["last.ckpt"]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    rows = list(csv.DictReader((run / "csv" / "metrics.csv").open()))
    assert last["epoch"] == max(int(r["epoch"]) for r in rows if r.get("val/bleu4"))  # the final


def nan_loss_at(monkeypatch, step: int) -> list[int]:
    """Make the training loss NaN at one global step; returns the steps it was called at."""
    from captioning.training.lit_module import CaptioningModule

    real, calls = CaptioningModule.loss, []

    def loss(self, batch):
        total, ce = real(self, batch)
        if self.training:
            calls.append(self.trainer.global_step)
            if self.trainer.global_step == step:
                return total * float("nan"), ce
        return total, ce

    monkeypatch.setattr(CaptioningModule, "loss", loss)
    return calls


def test_nan_loss_stops_with_a_clear_message(tmp_path, data_cache, monkeypatch):
    from captioning.training.guards import NonFiniteError

    nan_loss_at(monkeypatch, step=7)  # epoch 1, batch 2
    cfg = tiny(tmp_path, data_cache, "trainer.max_epochs=3")
    with pytest.raises(NonFiniteError, match=r"training loss is nan at epoch 1, batch 2 \(global"):
        train_script.train(cfg)
    # Stopped before the NaN reached the weights, and the epoch-0 checkpoint is still the best.
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["epoch000.ckpt", "last.ckpt"], ckpts
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_loss_skipped_under_skip_policy(tmp_path, data_cache, monkeypatch):

    calls = nan_loss_at(monkeypatch, step=3)
    cfg = tiny(tmp_path, data_cache, "nan_policy=skip", "test=false")
    from captioning.training import setup

    guards = []
    real = setup.instantiate_all

    def spy(cfg):
        trainer, callbacks = real(cfg)
        guards.append(callbacks["nan_guard"])
        return trainer, callbacks

    monkeypatch.setattr(setup, "instantiate_all", spy)
    best = train_script.train(cfg)
    assert guards[0].skipped == 1 and 3 in calls
    assert best is not None and math.isfinite(best)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())


def test_nan_validation_score_never_becomes_best(tmp_path, data_cache, monkeypatch):
    """Under skip, a NaN val/bleu4 (even in the first epoch) is not saved as the best."""
    from captioning.training import lit_module

    real, epochs = lit_module.score_corpus, []

    def score(preds, refs, meteor=False):
        scores = real(preds, refs, meteor=meteor)
        epochs.append(len(epochs))
        if len(epochs) == 1:  # epoch 0's validation
            scores["BLEU-4"] = float("nan")
        return scores

    monkeypatch.setattr(lit_module, "score_corpus", score)
    cfg = tiny(
        tmp_path, data_cache, "nan_policy=skip", "test=false", "callbacks.early_stopping=null"
    )
    train_script.train(cfg)
    best = sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch*.ckpt"))
    assert best == ["epoch001.ckpt"], best
    ckpt = torch.load(tmp_path / "checkpoints" / "epoch001.ckpt", weights_only=True)
    assert math.isfinite(ckpt["captioning"]["metrics"]["val/bleu4"])


def test_nan_validation_score_stops_under_stop_policy(tmp_path, data_cache, monkeypatch):
    from captioning.training import lit_module
    from captioning.training.guards import NonFiniteError

    real = lit_module.score_corpus
    monkeypatch.setattr(
        lit_module,
        "score_corpus",
        lambda p, r, meteor=False: {**real(p, r, meteor=meteor), "BLEU-4": math.nan},
    )
    with pytest.raises(NonFiniteError, match="val/bleu4 is nan after epoch 0"):
        train_script.train(tiny(tmp_path, data_cache, "test=false"))
    assert not list((tmp_path / "checkpoints").glob("*.ckpt"))  # nothing saved, best or last


def test_nan_policy_is_checked():
    from captioning.errors import ConfigError
    from captioning.training.guards import NonFiniteGuard

    with pytest.raises(ConfigError, match="stop or skip"):
        NonFiniteGuard("ignore")


# -- disk -----------------------------------------------------------------------------------
def unwritable(tmp_path: Path) -> Path:
    """A folder that cannot be created, even by root: its parent is a regular file (ENOTDIR).

    Tests run as root here, and root writes through chmod 0o555; a path under a file fails for
    every user, as a read-only mount would.
    """
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    return blocker / "checkpoints"


def test_unwritable_checkpoint_dir_fails_before_training(tmp_path, data_cache, monkeypatch):
    from captioning.errors import CheckpointDirError
    from captioning.training.datamodule import CaptionDataModule

    loaded = []
    monkeypatch.setattr(CaptionDataModule, "load", lambda self: loaded.append(1) or self)
    cfg = tiny(tmp_path, data_cache, f"callbacks.model_checkpoint.dirpath={unwritable(tmp_path)}")
    with pytest.raises(CheckpointDirError, match="cannot write checkpoints to .*a_file/check"):
        train_script.train(cfg)
    assert not loaded  # failed before even the data was loaded


def test_full_disk_fails_before_training(tmp_path, data_cache, monkeypatch):
    import shutil

    from captioning.errors import CheckpointDirError

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10_000))
    with pytest.raises(CheckpointDirError, match="only 0 MiB free under"):
        train_script.train(tiny(tmp_path, data_cache))
    assert not (tmp_path / "csv").exists()  # no epoch ran


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half way leaves the previous checkpoint as it was."""
    from captioning.errors import CheckpointDirError
    from captioning.training.checkpointing import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"v": torch.ones(3)}, path)
    real = torch.save

    def dies(obj, f):
        real(obj, f)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies)
    with pytest.raises(CheckpointDirError, match="No space left on device; the previous"):
        io.save_checkpoint({"v": torch.zeros(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


@pytest.mark.slow
def test_unwritable_checkpoint_dir_from_the_command_line(tmp_path, data_cache):
    proc = train_proc(
        [
            *TINY,
            f"hydra.run.dir={tmp_path}",
            f"callbacks.model_checkpoint.dirpath={unwritable(tmp_path)}",
        ],
        data_cache,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: cannot write checkpoints to "), lines
    assert "Not a directory" in lines[-1]
    assert "Traceback" not in proc.stderr


# -- data faults ----------------------------------------------------------------------------
def test_out_of_vocabulary_words_map_to_unk_and_long_captions_truncate():
    from captioning.vocab import Vocab

    v = Vocab.build(["a dog runs", "a cat sits"], max_len=4)
    ids = v.encode("A zebra runs!")
    assert v.decode(ids) == "a <unk> runs" and ids[2] == v.unk_id
    long = v.encode("a dog runs a cat sits a dog")
    assert len(long) == 4 + 2 and v.decode(long) == "a dog runs a"


def test_training_and_evaluation_encode_the_same_way(tmp_path, data_cache):
    """One path (Vocab.encode, truncated to max_len) for the training and validation tensors."""
    from omegaconf import OmegaConf

    from captioning.encoders import Preprocess
    from captioning.training.datamodule import CaptionDataModule

    PP64 = Preprocess(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # noqa: N806
    cfg = tiny(tmp_path, data_cache, "data.max_caption_len=3")
    dm = CaptionDataModule(
        OmegaConf.to_container(cfg.data, resolve=True), str(data_cache), preprocess=PP64
    ).load()
    for split in ("train", "val"):
        ds = dm.dataset(split)
        for i in range(4):
            caption = ds.refs[i][0]
            assert ds.encoded[i][0].tolist() == dm.vocab.encode(caption)
            assert len(ds.encoded[i][0]) <= 3 + 2
    assert dm.vocab.max_len == 3  # and decoding stops at the same length (val_decode.max_len)


def test_empty_captions_are_dropped_with_a_count(caplog):
    from captioning.data.dataset import drop_empty_captions

    refs = [["a dog", "", " . "], ["", "  ", "!"], ["a cat"]]
    kept, captions, images = drop_empty_captions(refs, "flickr8k/train")
    assert kept == [["a dog"], [], ["a cat"]]
    assert (captions, images) == (5, 1)
    assert "dropped 5 empty caption(s); 1 image(s)" in caplog.text


def test_dataset_without_empty_captions_in_its_samples(tmp_path):
    """An image whose captions are all empty yields no training or evaluation sample."""
    import datasets

    from captioning.data.dataset import CaptionDataset
    from captioning.encoders import Preprocess
    from captioning.vocab import Vocab
    from fixtures_data import colour, jpeg_bytes

    rows = {
        "image_id": ["a", "b", "c"],
        "image": [{"bytes": jpeg_bytes(colour(i)), "path": None} for i in range(3)],
        "captions": [["a red thing", ""], [".", " "], ["a blue thing"]],
    }
    ds = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "image_id": datasets.Value("string"),
                "image": datasets.Image(decode=False),
                "captions": datasets.List(datasets.Value("string")),
            }
        ),
    )
    vocab = Vocab.build([c for cs in rows["captions"] for c in cs])
    pp = Preprocess(16, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    train = CaptionDataset(ds, vocab, pp, train=True, preload=True, name="t/train")
    assert (train.dropped_captions, train.dropped_images, len(train)) == (3, 1, 2)
    assert {train[k]["caption"].tolist()[1] for k in range(2)} == {vocab.stoi["a"]}
    val = CaptionDataset(ds, vocab, pp, train=False, preload=True, name="t/val")
    assert [val[k]["image_id"] for k in range(len(val))] == ["a", "c"]


@pytest.mark.slow
def test_trains_on_flickr8k_layout_with_corrupt_images(tmp_path, data_cache):
    """20 images in the Kaggle layout, 2 of them corrupt: they are skipped and named once."""
    from fixtures_data import make_flickr8k_kaggle

    root = tmp_path / "flickr8k"
    make_flickr8k_kaggle(root, n=20, corrupt=(3, 8))
    # Not debug=tiny: its synthetic-only data.args would reach the Flickr source.
    proc = train_proc(
        [
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "data=flickr8k",
            "encoder=small_cnn",
            f"data.args.root={root}",
            "data.num_workers=0",
            "data.min_word_freq=1",
            "data.batch_size=8",
            "data.eval_batch_size=8",
            "decoder.embed_dim=32",
            "decoder.hidden_dim=64",
            "trainer.max_epochs=1",
            "trainer.log_every_n_steps=1",
            "test_decode.meteor=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path / "cache",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("skipped 2 of 20") == 1, out[-3000:]
    metrics = json.loads((tmp_path / "run" / "test_metrics.json").read_text())["metrics"]
    assert metrics["BLEU-1"] >= 0


@pytest.mark.slow
def test_sigterm_to_the_process_group_with_dataloader_workers(tmp_path, data_cache):
    """SLURM's scancel and a terminal's Ctrl-C signal the whole process group, DataLoader
    workers included: the workers must leave the signal to the main process, which finishes
    the step, saves and exits 128 + 15; the resumed run then completes."""
    run = [*EXACT, "data.num_workers=2", f"hydra.run.dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *run],
        cwd=ROOT,
        env=env(data_cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a job step or a shell's job
    )
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "checkpoints" / "last.ckpt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(0.5)  # into epoch 1, workers running
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr and "killed by signal" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("error: SIGTERM: stopped ")
    done = train_proc([*run, "resume=auto"], data_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 3 * BATCHES


@pytest.mark.parametrize("mode", ["RUN", "MULTIRUN"])
def test_an_interrupted_job_says_how_to_resume_its_run_or_its_sweep(mode, tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from captioning.training.guards import resume_advice

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            [f"hydra.mode={mode}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    try:
        advice = resume_advice(tmp_path / "sweep" / "3")
    finally:
        HydraConfig.instance().cfg = None
        GlobalHydra.instance().clear()
    if mode == "MULTIRUN":
        assert f"hydra.sweep.dir={tmp_path / 'sweep'}" in advice and "hydra.run.dir" not in advice
    else:
        assert f"hydra.run.dir={tmp_path / 'sweep' / '3'}" in advice
    assert "resume=auto" in advice


def test_a_finished_run_resumed_is_not_tested_again(tmp_path, data_cache, capsys):
    """Rerunning a finished sweep resumes every job: the test split is scored once per model."""
    from captioning.training import setup

    run = tmp_path / "run"
    best = train_script.train(tiny(run, data_cache, "encoder.fine_tune=none"))
    scored = (run / "test_metrics.json").stat().st_mtime_ns
    info = (run / "run_info.json").stat().st_mtime_ns
    first = json.loads((run / "test_metrics.json").read_text())
    capsys.readouterr()
    # every epoch trained and the best checkpoint tested: nothing is started again
    again = train_script.train(tiny(run, data_cache, "encoder.fine_tune=none", "resume=auto"))
    out = capsys.readouterr().out
    assert "finished before" in out and again == pytest.approx(best)
    assert (run / "test_metrics.json").stat().st_mtime_ns == scored
    assert (run / "run_info.json").stat().st_mtime_ns == info  # no trainer, no callbacks ran
    # an epoch more: the trainer resumes, trains it, and tests only a checkpoint not scored yet
    train_script.train(
        tiny(run, data_cache, "encoder.fine_tune=none", "resume=auto", "trainer.max_epochs=3")
    )
    out = capsys.readouterr().out
    assert "finished before" not in out and (run / "run_info.json").stat().st_mtime_ns != info
    assert json.loads((run / "run_info.json").read_text())["epochs"] == 3
    now = json.loads((run / "test_metrics.json").read_text())
    if now["checkpoint"] == first["checkpoint"]:  # the best is still the one tested: kept
        assert "scored before" in out and now["metrics"] == first["metrics"]
        assert (run / "test_metrics.json").stat().st_mtime_ns == scored
    else:  # the new epoch is the best: it is tested
        assert "scored before" not in out and now["checkpoint"].endswith("epoch002.ckpt")
    # another decoding, or a checkpoint written after the scores: tested again
    assert (
        setup.already_tested(run, first["checkpoint"], {**first["decode"], "beam_size": 9}) is None
    )
    os.utime(first["checkpoint"], ns=(scored + 10**9, scored + 10**9))
    assert setup.already_tested(run, first["checkpoint"], first["decode"]) is None
