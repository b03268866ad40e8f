"""The score CLI: both input formats, --out, id normalisation, and a clean exit 2 on bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from captioning import metrics as M
from captioning.score import main

ROOT = Path(__file__).resolve().parents[1]
REFS = {
    "1": ["a dog runs on the grass", "a brown dog is running"],
    "2": ["two kids play in the snow", "children playing in snow"],
}
PREDS = {"1": "a dog runs on grass", "2": "kids play in the snow"}


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def run(tmp_path: Path, preds, refs, *extra: str) -> int:
    pred_file = write(tmp_path / "preds.json", preds)
    ref_file = write(tmp_path / "refs.json", refs)
    return main(["--pred", str(pred_file), "--refs", str(ref_file), "--no-meteor", *extra])


def coco_annotations(refs: dict) -> dict:
    images = [{"id": int(k), "file_name": f"{k}.jpg"} for k in refs]
    anns = [{"image_id": int(k), "id": i, "caption": c} for i, (k, c) in
            enumerate((k, c) for k, v in refs.items() for c in v)]  # fmt: skip
    return {"images": images, "annotations": anns}


@pytest.fixture
def expected() -> dict:
    return M.score_corpus(PREDS, REFS, meteor=False)


@pytest.mark.parametrize(
    ("preds", "refs"),
    [
        (PREDS, REFS),  # {id: caption} and {id: [captions]}
        ([{"image_id": int(k), "caption": v} for k, v in PREDS.items()], coco_annotations(REFS)),
        ([{"image_id": k, "caption": v} for k, v in PREDS.items()], coco_annotations(REFS)),
        (PREDS, coco_annotations(REFS)),  # "1" in a dict key matches the int 1 of COCO
    ],
)
def test_both_formats_give_the_same_scores(tmp_path: Path, capsys, preds, refs, expected) -> None:
    assert run(tmp_path, preds, refs, "--out", str(tmp_path / "scores.json")) == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == list(M.METRIC_KEYS)
    assert printed["METEOR"] is None
    for key in M.METRIC_KEYS[:4] + ("ROUGE-L", "CIDEr"):
        assert printed[key] == pytest.approx(expected[key], abs=1e-12)
    assert json.loads((tmp_path / "scores.json").read_text()) == printed


def test_allow_missing_scores_only_predicted_images(tmp_path: Path, capsys) -> None:
    assert run(tmp_path, {"1": PREDS["1"]}, REFS, "--allow-missing") == 0
    printed = json.loads(capsys.readouterr().out)
    alone = M.score_corpus({"1": PREDS["1"]}, {"1": REFS["1"]}, meteor=False)
    assert printed["CIDEr"] == pytest.approx(alone["CIDEr"])


@pytest.mark.parametrize(
    ("preds", "refs", "message"),
    [
        ({"3": "a cat"} | PREDS, REFS, "prediction for image 3 has no references"),
        ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], REFS,
         "more than one prediction for image 1"),
        ([{"image_id": 1, "caption": "a"}, {"image_id": "1", "caption": "b"}], REFS,
         "more than one prediction for image '1'"),
        ('{"1": "a dog", "1": "a cat", "2": "kids"}', REFS, "duplicate key '1'"),
        ({"1": PREDS["1"]}, REFS, "--allow-missing"),
        ("{not json", REFS, "not valid JSON"),
        (PREDS, "", "not valid JSON"),
        ([{"image_id": 1}], REFS, 'entry 0 is not an object with "image_id" and "caption"'),
        ({"1": 5, "2": "x"}, REFS, "caption of image '1' is not a string"),
        ([{"image_id": 1.5, "caption": "a"}], REFS, "image id must be an integer or a string"),
        (PREDS, {"1": [], "2": ["a"]}, "needs a non-empty list of captions"),
        (PREDS, {"1": "a dog", "2": ["a"]}, "needs a non-empty list of captions"),
        (PREDS, [1, 2], "expected an {image_id: [captions]} object"),
        ("[]", REFS, "holds no predictions"),
    ],
)  # fmt: skip
def test_bad_input_exits_2_with_one_line(tmp_path: Path, capsys, preds, refs, message) -> None:
    assert run(tmp_path, preds, refs) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert message in captured.err


def test_missing_file_exits_2(tmp_path: Path, capsys) -> None:
    ref_file = write(tmp_path / "refs.json", REFS)
    missing = tmp_path / "nope.json"
    assert main(["--pred", str(missing), "--refs", str(ref_file), "--no-meteor"]) == 2
    assert capsys.readouterr().err == f"error: predictions file not found: {missing}\n"


def test_module_entry_point(tmp_path: Path) -> None:
    pred_file = write(tmp_path / "preds.json", PREDS)
    ref_file = write(tmp_path / "refs.json", REFS)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "captioning.score", "--pred", str(pred_file)]
    ok = subprocess.run([*cmd, "--refs", str(ref_file), "--no-meteor"], capture_output=True,
                        text=True, env=env, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert set(json.loads(ok.stdout)) == set(M.METRIC_KEYS)
    bad = subprocess.run([*cmd, "--refs", str(tmp_path / "missing.json")], capture_output=True,
                         text=True, env=env, check=False)  # fmt: skip
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().startswith("error: references file not found")
    helped = subprocess.run([*cmd[:3], "--help"], capture_output=True, text=True, env=env,
                            check=False)  # fmt: skip
    assert "42" in helped.stdout and "same image" in helped.stdout
