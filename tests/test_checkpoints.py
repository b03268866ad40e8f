"""Checkpoints describe themselves, hold only plain values, and anything else is refused clearly.

A foreign, truncated, empty, malicious or too-new file gives a `CheckpointError` (on the command
line: one line, exit status 2), never a traceback, and never runs code: the malicious files here
would write a marker file if unpickled without `weights_only`, and the tests check that it does
not exist afterwards (and, as a control, that it does when loaded unsafely).
"""

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402
from captioning.checkpoint import read_checkpoint  # noqa: E402
from captioning.cli import run_safely  # noqa: E402
from captioning.errors import CheckpointError  # noqa: E402
from captioning.inference import load_model  # noqa: E402
from captioning.training import setup as train_setup  # noqa: E402

SMALL = [
    "debug=tiny",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "data.args.num_train=16",
    "data.args.num_val=8",
    "data.args.num_test=8",
    "test_decode.meteor=false",
]


class Evil:
    """Unpickling this calls Path.write_text(marker, "pwned")."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def assert_plain(obj, path: str = "") -> None:
    """Only containers, numbers, strings, None and tensors (what weights_only=True allows)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert isinstance(k, str | int), (path, k)
            assert_plain(v, f"{path}.{k}")
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            assert_plain(v, f"{path}[{i}]")
    else:
        assert obj is None or isinstance(obj, str | int | float | bool | torch.Tensor), (path, obj)


def tiny(tmp_path: Path, cache: Path, *extra: str):
    torch.set_num_threads(1)  # two shared cores
    return compose_cfg("train", [*SMALL, *extra], out=tmp_path, cache=cache)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> Path:
    """last.ckpt of a one-epoch tiny run."""
    out = tmp_path_factory.mktemp("trained")
    train_script.train(tiny(out, data_cache, "trainer.max_epochs=1", "test=false"))
    return out / "checkpoints" / "last.ckpt"


def test_checkpoint_describes_itself_in_plain_values(trained):
    ckpt = torch.load(trained, map_location="cpu", weights_only=True)
    assert_plain(ckpt)
    info = ckpt["captioning"]
    assert info["format"] == 1
    assert info["encoder"]["name"] == "small_cnn" and info["decoder"]["name"] == "soft_attention"
    assert info["vocab"]["itos"][:4] == ["<pad>", "<start>", "<end>", "<unk>"]
    assert info["vocab"]["max_len"] == 20
    assert {"image_size", "resize_size", "mean", "std"} <= set(info["preprocess"])
    data = info["data"]
    assert data["name"] == "synthetic" and data["sizes"] == {"train": 16, "val": 8, "test": 8}
    assert data["args"]["num_train"] == 16 and data["config"]["batch_size"] == 16
    assert "val/bleu4" in info["metrics"] and info["monitor"] == "val/bleu4"
    assert info["monitor_best"] == pytest.approx(info["metrics"]["val/bleu4"])
    assert info["code_version"].startswith("0.1.0")
    # What an exact resume needs, in the same plain form.
    assert {"optimizer_states", "lr_schedulers", "loops", "callbacks"} <= set(ckpt)
    resume = ckpt["callbacks"]["ResumeState"]
    assert {"rng", "generator", "mid_epoch", "batches_done"} <= set(resume)
    assert resume["mid_epoch"] is False and isinstance(resume["rng"]["numpy"]["keys"], list)
    assert any(k.startswith("ModelCheckpoint{") for k in ckpt["callbacks"])  # old key kept


def test_lightning_loads_checkpoints_with_weights_only(trained, tmp_path):
    """Lightning's own loader (trainer.fit(ckpt_path=...)) defaults to torch's weights_only=True."""
    from lightning.fabric.utilities.cloud_io import _load

    assert "state_dict" in _load(trained)
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil(marker)}, evil)
    with pytest.raises(pickle.UnpicklingError):
        _load(evil)
    assert not marker.exists()


def write_bad(kind: str, tmp_path: Path, trained: Path) -> tuple[Path, str]:
    """A bad checkpoint file of a given kind, and the message it must give."""
    path = tmp_path / f"{kind}.ckpt"
    marker = tmp_path / "pwned"
    if kind == "missing":
        return path, "checkpoint not found"
    if kind == "empty":
        path.write_bytes(b"")
        return path, "is empty"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
        return path, "not a readable checkpoint"
    if kind == "passwd":  # a text file that once ended in "list index out of range"
        path.write_text("root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1::/usr/sbin:/bin/sh\n")
        return path, r"not a readable checkpoint: not a file written by torch.save \(train.py[^:]*$"
    if kind == "random_bytes":
        path.write_bytes(os.urandom(4096))
        return path, "not a readable checkpoint"
    if kind == "truncated":
        data = trained.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path, "not a readable checkpoint"
    if kind == "truncated_by_one_byte":
        path.write_bytes(trained.read_bytes()[:-1])
        return path, "not a readable checkpoint"
    if kind == "plain_dict":
        torch.save({"a": 1}, path)
        return path, "not a checkpoint of this project"
    if kind == "torchvision_state_dict":
        import torchvision

        torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), path)
        return path, "not a checkpoint of this project"
    if kind == "malicious":
        ckpt = torch.load(trained, weights_only=True)
        ckpt["captioning"]["extra"] = Evil(marker)
        torch.save(ckpt, path)
        return path, "not a readable checkpoint"
    if kind == "malicious_legacy_format":
        torch.save(
            {"captioning": Evil(marker), "state_dict": {}},
            path,
            _use_new_zipfile_serialization=False,
        )
        return path, "not a readable checkpoint"
    if kind == "malicious_raw_pickle":
        path.write_bytes(pickle.dumps(Evil(marker)))
        return path, "not a readable checkpoint"
    if kind == "newer_format":
        ckpt = torch.load(trained, weights_only=True)
        ckpt["captioning"]["format"] = 99
        torch.save(ckpt, path)
        return path, "format 99, newer than this version supports"
    if kind == "block_not_a_dict":
        torch.save({"captioning": "v1", "state_dict": {}}, path)
        return path, "not a checkpoint of this project"
    if kind == "no_vocab":
        ckpt = torch.load(trained, weights_only=True)
        del ckpt["captioning"]["vocab"]
        torch.save(ckpt, path)
        return path, "incomplete"
    raise AssertionError(kind)


BAD = [
    "missing",
    "empty",
    "text",
    "passwd",
    "random_bytes",
    "truncated",
    "truncated_by_one_byte",
    "plain_dict",
    "torchvision_state_dict",
    "malicious",
    "malicious_legacy_format",
    "malicious_raw_pickle",
    "newer_format",
    "block_not_a_dict",
    "no_vocab",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_checkpoints_give_a_clear_error(kind, tmp_path, trained):
    path, message = write_bad(kind, tmp_path, trained)
    for load in (read_checkpoint, load_model):
        with pytest.raises(CheckpointError, match=message):
            load(path)
    assert not (tmp_path / "pwned").exists()


def test_the_malicious_files_are_malicious(tmp_path, trained):
    """Control: loaded without weights_only, they do run their code."""
    for kind in ("malicious", "malicious_legacy_format", "malicious_raw_pickle"):
        path, _ = write_bad(kind, tmp_path, trained)
        marker = tmp_path / "pwned"
        marker.unlink(missing_ok=True)
        with contextlib.suppress(Exception):  # a raw pickle is no torch file, but runs first
            torch.load(path, weights_only=False)
        assert marker.read_text() == "pwned", kind


@pytest.mark.parametrize("kind", ["malicious", "truncated", "plain_dict", "newer_format", "empty"])
def test_resume_from_a_bad_checkpoint_exits_with_one_line(
    kind, tmp_path, trained, data_cache, capsys
):
    """`train.py ckpt_path=<bad>`: the entry point's error path, in-process."""
    path, message = write_bad(kind, tmp_path, trained)
    cfg = tiny(tmp_path / "run", data_cache, f"ckpt_path={path}")
    with pytest.raises(SystemExit) as exit_:
        run_safely(train_script.train, cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # Lightning may have said "GPU available: ..." before
    assert last.startswith("error: ") and message in last and "Traceback" not in err, err
    assert not (tmp_path / "pwned").exists()


def test_lightning_resume_path_refuses_code_even_without_our_check(
    tmp_path, trained, data_cache, monkeypatch
):
    """Defence in depth: with our own read skipped, trainer.fit(ckpt_path=...) still refuses."""
    path, _ = write_bad("malicious", tmp_path, trained)
    monkeypatch.setattr(train_setup, "read_checkpoint", lambda p: None)
    with pytest.raises(pickle.UnpicklingError):
        train_script.train(tiny(tmp_path / "run", data_cache, f"ckpt_path={path}"))
    assert not (tmp_path / "pwned").exists()


def test_resume_refuses_a_weights_only_checkpoint(tmp_path, trained, data_cache):
    ckpt = torch.load(trained, weights_only=True)
    path = tmp_path / "weights.ckpt"
    torch.save({k: ckpt[k] for k in ("state_dict", "captioning", "epoch", "global_step")}, path)
    load_model(path)  # fine for captioning
    with pytest.raises(CheckpointError, match="holds weights only"):
        train_script.train(tiny(tmp_path / "run", data_cache, f"ckpt_path={path}"))


def test_resume_refuses_another_model(tmp_path, trained, data_cache):
    cfg = tiny(tmp_path / "run", data_cache, f"ckpt_path={trained}", "decoder.hidden_dim=32")
    with pytest.raises(CheckpointError, match="holds another model .* than this config builds"):
        train_script.train(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
@pytest.mark.parametrize("kind", ["malicious", "truncated"])
def test_bad_checkpoint_on_the_command_line(script, kind, tmp_path, trained, data_cache):
    path, message = write_bad(kind, tmp_path, trained)
    env = {**os.environ, "CAPTIONING_CACHE": str(data_cache), "OMP_NUM_THREADS": "1"}
    args = SMALL[:3] if script == "train.py" else []  # evaluate.yaml has no trainer/debug groups
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / script),
            *args,
            f"ckpt_path={path}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "pwned").exists()
