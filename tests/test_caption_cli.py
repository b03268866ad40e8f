"""caption.py: captions good images, one error line for a bad one, clear errors without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from test_app import encode, scene, trained_checkpoint

from conftest import ROOT


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, data_cache)


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "caption.py"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_captions_good_images_and_reports_a_bad_one(tiny_ckpt, tmp_path):
    good, wide, bad = tmp_path / "good.jpg", tmp_path / "wide.png", tmp_path / "bad.png"
    good.write_bytes(encode(scene((320, 240)), "JPEG"))
    wide.write_bytes(encode(scene((900, 200), seed=1), "PNG"))
    bad.write_bytes(b"<html>404 Not Found</html>")
    run_dir = tmp_path / "run"
    r = run_cli(
        f"ckpt_path={tiny_ckpt}",
        f"images=[{good},{bad},{wide}]",
        "decode.beam_size=3",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 2, r.stderr  # some image could not be captioned
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert any("bad.png" in e and "HTML" in e for e in errors), r.stderr
    assert any("1 of 3 images" in e for e in errors)
    assert f"{good}" in r.stdout and f"{wide}" in r.stdout
    assert "  1. " in r.stdout and "  3. " in r.stdout and "score" in r.stdout

    records = json.loads((run_dir / "captions.json").read_text())
    assert [Path(x["image"]).name for x in records] == ["good.jpg", "wide.png"]
    for rec in records:
        assert len(rec["beams"]) == 3
        figure = Path(rec["figure"])
        assert figure.parent == run_dir and figure.is_file()
        with Image.open(figure) as im:  # the image tile plus one tile per word
            assert im.width == 5 * 160 and im.height >= 178


def test_default_checkpoint_is_the_newest_under_outputs(tiny_ckpt, tmp_path):
    image = tmp_path / "a.png"
    image.write_bytes(encode(scene(), "PNG"))
    r = run_cli(f"images=[{image}]", cwd=tmp_path)  # no outputs/ with a checkpoint here
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "no checkpoint given" in r.stderr and "python train.py" in r.stderr

    target = tmp_path / "outputs" / "train" / "runs" / "x" / "checkpoints" / "last.ckpt"
    target.parent.mkdir(parents=True)
    shutil.copy(tiny_ckpt, target)
    r = run_cli(f"images=[{image}]", "figures=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "outputs/train/runs/x/checkpoints/last.ckpt" in r.stdout
    assert "  1. " in r.stdout


def test_no_images_is_a_clear_error(tiny_ckpt, tmp_path):
    r = run_cli(f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "no images given" in r.stderr
