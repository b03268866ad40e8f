"""A short self-critical run on the built-in data raises val CIDEr-D over its cross-entropy start."""

import csv
import sys

import pytest
import torch

from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))
import train as train_script  # noqa: E402

pytestmark = pytest.mark.slow

DATA = ["debug=tiny", "trainer.accelerator=cpu", "data.args.num_train=256", "data.args.num_val=100"]


def metrics_rows(run_dir) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def val_cider(run_dir) -> list[float]:
    return [float(r["val/cider"]) for r in metrics_rows(run_dir) if r.get("val/cider")]


@pytest.mark.parametrize("score_end", [False, True])
def test_self_critical_raises_val_cider(tmp_path, data_cache, score_end):
    xe_dir, sc_dir = tmp_path / "xe", tmp_path / "scst"
    xe = compose_cfg("train", [*DATA, "trainer.max_epochs=3", "test=false"], xe_dir, data_cache)
    train_script.train(xe)
    start_ckpt = xe_dir / "checkpoints" / "last.ckpt"
    start = val_cider(xe_dir)[-1]  # the val CIDEr-D of exactly the weights SCST starts from
    saved = torch.load(start_ckpt, map_location="cpu", weights_only=True)
    assert saved["captioning"]["metrics"]["val/cider"] == pytest.approx(start)

    sc = compose_cfg(
        "train",
        [
            *DATA,
            f"init_from={start_ckpt}",
            f"scst={{samples: 5, baseline: mean, score_end: {str(score_end).lower()}}}",
            "monitor=val/cider",
            "optim.decoder_lr=1e-4",
            "optim.encoder_lr=1e-4",
            "optim.scheduler=none",
            "trainer.max_epochs=4",
            "test=false",
        ],
        sc_dir,
        data_cache,
    )
    best = train_script.train(sc)
    history = val_cider(sc_dir)
    assert len(history) == 4
    assert best == pytest.approx(max(history))
    assert best > start, (start, history)
    # and the run trained the self-critical objective: rewards were logged
    assert any(r.get("train/reward") for r in metrics_rows(sc_dir))
