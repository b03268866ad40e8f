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


def run_cli_merged(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """caption.py with stderr folded into stdout, to see what came before what."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "caption.py"), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=300,
    )


def test_plain_paths_folders_and_globs(tiny_ckpt, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "in_folder.png").write_bytes(encode(scene(), "PNG"))
    (tmp_path / "plain one.jpg").write_bytes(encode(scene(seed=1), "JPEG"))
    for k in (2, 3):
        (tmp_path / f"globbed{k}.png").write_bytes(encode(scene(seed=k), "PNG"))
    run_dir = tmp_path / "run"
    r = run_cli(
        str(tmp_path / "plain one.jpg"),
        str(folder),
        str(tmp_path / "globbed*.png"),  # quoted: the shell left the pattern to caption.py
        f"ckpt_path={tiny_ckpt}",
        "figures=false",
        f"hydra.run.dir={run_dir}",
    )
    assert r.returncode == 0, r.stderr
    records = json.loads((run_dir / "captions.json").read_text())
    names = sorted(Path(x["image"]).name for x in records)
    assert names == ["globbed2.png", "globbed3.png", "in_folder.png", "plain one.jpg"]
    # The model was trained on the built-in scenes: one line says so, beside the captions.
    assert sum("built-in synthetic scenes" in line for line in r.stdout.splitlines()) == 1


def test_a_missing_file_is_named_before_the_model_loads(tiny_ckpt, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(encode(scene(), "PNG"))
    missing = tmp_path / "typo.jpg"
    run_dir = tmp_path / "run"
    r = run_cli_merged(
        str(missing), str(good), f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={run_dir}"
    )
    assert r.returncode == 2 and "Traceback" not in r.stdout  # not every image was captioned
    out = r.stdout
    assert f"error: {missing}: no such file" in out
    assert out.index(f"error: {missing}") < out.index("checkpoint ")  # before the model loaded
    assert "1 of 2 images could not be captioned" in out
    records = json.loads((run_dir / "captions.json").read_text())
    assert [Path(x["image"]).name for x in records] == ["good.png"]

    # Nothing to caption at all: the model never loads and no captions.json appears.
    run_dir = tmp_path / "run2"
    r = run_cli_merged(str(missing), f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={run_dir}")
    assert r.returncode == 2 and "Traceback" not in r.stdout
    assert f"{missing}: no such file" in r.stdout and "checkpoint " not in r.stdout
    assert not (run_dir / "captions.json").exists()


def test_no_captions_json_when_no_image_could_be_captioned(tiny_ckpt, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"<html>404 Not Found</html>")
    run_dir = tmp_path / "run"
    r = run_cli(str(bad), f"ckpt_path={tiny_ckpt}", f"hydra.run.dir={run_dir}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "1 of 1 images could not be captioned" in r.stderr
    assert not (run_dir / "captions.json").exists()


def with_score(src: Path, dst: Path, score: float, monitor: str = "val/bleu4") -> Path:
    """A copy of a checkpoint that records `score` as its selection metric."""
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["captioning"]["monitor"] = monitor
    ckpt["captioning"]["metrics"] = {**ckpt["captioning"]["metrics"], monitor: score}
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    return dst


def test_default_checkpoint_is_the_best_of_the_newest_completed_run(tiny_ckpt, tmp_path):
    runs = tmp_path / "outputs" / "train" / "runs"
    done = runs / "2020-01-01_completed"
    with_score(tiny_ckpt, done / "checkpoints" / "epoch001.ckpt", 0.61)
    with_score(tiny_ckpt, done / "checkpoints" / "last.ckpt", 0.52)
    (done / "test_metrics.json").write_text("{}")
    # Written later, but stopped after a few batches: never finished, never chosen.
    with_score(tiny_ckpt, runs / "2020-01-02_unfinished" / "checkpoints" / "last.ckpt", 0.01)
    image = tmp_path / "a.png"
    image.write_bytes(encode(scene(), "PNG"))
    r = run_cli(str(image), "figures=false", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    chosen = next(line for line in r.stdout.splitlines() if line.startswith("checkpoint "))
    assert "2020-01-01_completed/checkpoints/epoch001.ckpt" in chosen
    assert "val/bleu4 0.6100" in chosen and "newest completed run" in chosen


def test_caption_py_imports_no_app():
    code = (
        "import sys, runpy; sys.argv = ['caption.py', '--help']\n"
        "try:\n    runpy.run_path('caption.py', run_name='not_main')\nfinally:\n"
        "    print([m for m in sys.modules if m.startswith('captioning.app')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_caption_py_captions_without_importing_the_app(tiny_ckpt, tmp_path):
    image = tmp_path / "scene.png"
    image.write_bytes(encode(scene((96, 96)), "PNG"))
    argv = [
        "caption.py",
        f"ckpt_path={tiny_ckpt}",
        f"images=[{image}]",
        f"hydra.run.dir={tmp_path}",
    ]
    code = (
        f"import atexit, sys, runpy; sys.argv = {argv!r}\n"
        "atexit.register(lambda: print([m for m in sys.modules if m.startswith('captioning.app')]))\n"
        "runpy.run_path('caption.py', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert str(image) in out.stdout  # it did caption the image
    assert out.stdout.strip().splitlines()[-1] == "[]"
