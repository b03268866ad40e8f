"""The app's account of its model (data, test scores, the synthetic notice), the checkpoint it
picks by itself, and dynamic batching (a batched request gets the caption it gets alone)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from test_app import encode, scene, trained_checkpoint

from captioning.app.batching import Batcher
from captioning.app.model_card import (
    SYNTHETIC_NOTICE,
    best_photo_checkpoint,
    model_card,
    read_test_scores,
)
from captioning.app.server import create_app
from captioning.app.service import CaptionService


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, data_cache)


def photo_run(tiny_ckpt: Path, root: Path, name: str = "epoch003.ckpt", **data) -> Path:
    """The tiny checkpoint relabelled as trained on Flickr8k, in a run folder with its test."""
    ckpt = torch.load(tiny_ckpt, map_location="cpu", weights_only=True)
    ckpt["captioning"]["data"] = {
        "name": "flickr8k",
        "args": {},
        "sizes": {"train": 6000, "val": 1000, "test": 1000},
        **data,
    }
    path = root / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    metrics = {"BLEU-4": 0.224, "CIDEr": 0.56, "METEOR": None}
    saved = {"split": "test", "checkpoint": str(path), "decode": {"beam_size": 5}}
    (root / "test_metrics.json").write_text(json.dumps({**saved, "metrics": metrics}))
    return path


# ---------------------------------------------------------------- what the model knows


def test_a_synthetic_model_says_it_describes_shapes(tiny_ckpt):
    from fastapi.testclient import TestClient

    with TestClient(create_app(tiny_ckpt, batch_wait_ms=0)) as client:
        info = client.get("/api/model").json()
    assert info["trained_on"].startswith("synthetic scenes")
    assert "coloured shapes" in info["trained_on"]
    assert info["real_photos"] is False
    assert info["notice"] == SYNTHETIC_NOTICE
    assert "make app CKPT=" in info["notice"] and "experiment=flickr8k" in info["notice"]
    assert info["test_scores"] is None  # the tiny run skipped its test


def test_a_photo_model_gives_its_data_and_test_scores(tiny_ckpt, tmp_path):
    from fastapi.testclient import TestClient

    ckpt = photo_run(tiny_ckpt, tmp_path / "run")
    with TestClient(create_app(ckpt, batch_wait_ms=0)) as client:
        info = client.get("/api/model").json()
    assert info["trained_on"] == "Flickr8k: 6,000 photos with human-written captions"
    assert info["real_photos"] is True and info["notice"] is None
    scores = info["test_scores"]
    assert scores["metrics"] == {"BLEU-4": 0.224, "CIDEr": 0.56}  # no null METEOR
    assert scores["this_checkpoint"] is True and scores["checkpoint"] == "epoch003.ckpt"
    assert scores["decode"] == {"beam_size": 5}


def test_test_scores_of_another_checkpoint_of_the_run_say_so(tiny_ckpt, tmp_path):
    best = photo_run(tiny_ckpt, tmp_path / "run")
    last = best.with_name("last.ckpt")
    shutil.copy(best, last)
    scores = read_test_scores(last)
    assert scores["checkpoint"] == "epoch003.ckpt" and scores["this_checkpoint"] is False
    (tmp_path / "run" / "test_metrics.json").write_text("{not json")
    assert read_test_scores(best) is None


@pytest.mark.parametrize(
    "data, words",
    [
        ({}, "not recorded"),
        ({"name": "coco", "sizes": {"train": 113287}}, "MS-COCO: 113,287 photos"),
        ({"name": "hub", "args": {"hub_id": "someone/captions"}}, "someone/captions"),
    ],
)
def test_trained_on_in_words(tmp_path, data, words):
    card = model_card({"data": data}, tmp_path / "x.ckpt")
    assert words in card["trained_on"]
    assert card["notice"] is None


def test_best_photo_checkpoint_is_chosen_over_a_newer_synthetic_one(tiny_ckpt, tmp_path):
    from captioning.app import __main__ as entry

    worse = photo_run(tiny_ckpt, tmp_path / "a")
    better = photo_run(tiny_ckpt, tmp_path / "b")
    for path, cider in ((worse, 0.40), (better, 0.55)):
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["captioning"]["metrics"] = {"val/cider": cider, "val/bleu4": 0.2}
        torch.save(ckpt, path)
    synthetic = tmp_path / "c" / "checkpoints" / "last.ckpt"  # the newest file of all
    synthetic.parent.mkdir(parents=True)
    shutil.copy(tiny_ckpt, synthetic)
    (tmp_path / "d.ckpt").write_bytes(b"half-written")
    t = time.time()
    os.utime(worse, (t + 10, t + 10))  # newer than the better one: the score decides
    os.utime(synthetic, (t + 20, t + 20))

    assert best_photo_checkpoint(tmp_path) == better
    args = entry.parse_args(["--outputs", str(tmp_path)])
    assert entry.find_or_train(args) == better
    args = entry.parse_args(["--outputs", str(tmp_path), "--ckpt", str(synthetic)])
    assert entry.find_or_train(args) == synthetic  # a named checkpoint always wins


def test_without_photo_checkpoints_the_newest_is_served(tiny_ckpt, tmp_path):
    from captioning.app import __main__ as entry

    synthetic = tmp_path / "run" / "checkpoints" / "last.ckpt"
    synthetic.parent.mkdir(parents=True)
    shutil.copy(tiny_ckpt, synthetic)
    assert best_photo_checkpoint(tmp_path) is None
    assert entry.find_or_train(entry.parse_args(["--outputs", str(tmp_path)])) == synthetic


# ---------------------------------------------------------------- dynamic batching


def burst(service: CaptionService, images: list[tuple[bytes, int]]) -> list[dict]:
    """Caption `images` ((data, beam size) each) from as many threads, all released at once."""
    out: list = [None] * len(images)
    barrier = threading.Barrier(len(images))

    def worker(i: int) -> None:
        barrier.wait()
        out[i] = service.caption(images[i][0], beam_size=images[i][1])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


def test_batched_requests_get_the_captions_they_get_alone(tiny_ckpt):
    images = [(encode(scene((64 + 8 * i, 48 + 4 * i), seed=i), "PNG"), 3) for i in range(8)]
    images += [(encode(scene(seed=20 + i), "JPEG"), k) for i, k in enumerate((1, 5, 5))]
    alone = CaptionService(tiny_ckpt, batch_wait_ms=0)
    batched = CaptionService(tiny_ckpt, batch_wait_ms=500, max_batch=16)
    try:
        expected = [alone.caption(data, beam_size=k) for data, k in images]
        got = burst(batched, images)
    finally:
        batched.close()
    assert all(e["batch_size"] == 1 for e in expected)
    assert max(g["batch_size"] for g in got) >= 4  # they really were searched together
    assert batched.requests == len(images)
    for g, e in zip(got, expected, strict=True):
        assert g["caption"] == e["caption"]
        assert [b["words"] for b in g["beams"]] == [b["words"] for b in e["beams"]]
        # Batched matmuls sum in another order: the numbers agree to float rounding.
        for gb, eb in zip(g["beams"], e["beams"], strict=True):
            assert gb["score"] == pytest.approx(eb["score"], abs=2e-4)
            assert gb["logprob"] == pytest.approx(eb["logprob"], abs=2e-4)
            np.testing.assert_allclose(gb["attention"], eb["attention"], atol=2e-4)
        assert g["image"] == e["image"] and g["warnings"] == e["warnings"]


def test_batching_off_runs_each_request_alone(tiny_ckpt):
    alone = CaptionService(tiny_ckpt, batch_wait_ms=0)
    assert alone.batcher is None
    got = burst(alone, [(encode(scene(seed=i), "PNG"), 3) for i in range(4)])
    assert [g["batch_size"] for g in got] == [1, 1, 1, 1]


def test_batcher_waits_only_for_requests_on_their_way():
    seen: list[int] = []

    def run(jobs):
        seen.append(len(jobs))
        if any(j.beam_size == 99 for j in jobs):
            raise RuntimeError("the model failed")
        return [j.images.item() * 2 for j in jobs]

    batcher = Batcher(run, wait_s=5.0, max_batch=3)
    try:
        t0 = time.perf_counter()
        assert batcher.submit(torch.tensor(1.0), 2).future.result(timeout=10) == 2
        assert time.perf_counter() - t0 < 2.5  # nobody else was coming: no 5 s window
        with contextlib.ExitStack() as stack:
            for _ in range(5):  # five requests announce themselves, then submit one by one
                stack.enter_context(batcher.expecting())
            jobs = []
            for i in range(5):
                jobs.append(batcher.submit(torch.tensor(float(i)), 2))
                time.sleep(0.05)  # the batch waits for them, not for the window's end
        assert [j.future.result(timeout=10) for j in jobs] == [0, 2, 4, 6, 8]
        assert seen == [1, 3, 2]  # at most max_batch per batch
        failing = [batcher.submit(torch.tensor(1.0), 99) for _ in range(2)]
        for job in failing:  # every request of the failed batch hears why
            with pytest.raises(RuntimeError, match="the model failed"):
                job.future.result(timeout=10)
        assert batcher.submit(torch.tensor(5.0), 2).future.result(timeout=10) == 10  # still up
    finally:
        batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(torch.tensor(1.0), 2)
    with pytest.raises(ValueError):
        Batcher(run, wait_s=0, max_batch=4)
