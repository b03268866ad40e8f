"""Sweep report: a synthetic multirun tree (one job failed, one logged to W&B only) -> md/csv/png."""

import csv
import json
import sys
from pathlib import Path

import matplotlib
import pytest
import torch
import yaml

from captioning import report
from captioning.report.jobs import _is_sweep

HEADER = [
    "epoch",
    "step",
    "train/loss",
    "val/bleu1",
    "val/bleu2",
    "val/bleu3",
    "val/bleu4",
    "val/cider",
    "val/bleu4_best",
]


def write_job(
    sweep: Path,
    num: int,
    overrides: list[str],
    *,
    epochs: list[dict] | None = None,
    info: dict | None = None,
    test: dict | None = None,
    ckpt: dict | None = None,
) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"monitor": "val/bleu4", "test": True})
    )
    hydra = {"hydra": {"job": {"num": num}, "sweeper": {"params": None}}}
    (job / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    if epochs is not None:
        (job / "csv").mkdir()
        with (job / "csv" / "metrics.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=HEADER)
            w.writeheader()
            for e in epochs:  # a training row, then the validation row of the epoch
                w.writerow({"epoch": e["epoch"], "step": 10 * e["epoch"], "train/loss": 3.0})
                w.writerow(
                    {
                        "epoch": e["epoch"],
                        "step": 10 * e["epoch"] + 9,
                        **{f"val/{k}": v for k, v in e.items() if k != "epoch"},
                    }
                )
    if info is not None:
        (job / "run_info.json").write_text(json.dumps(info))
    if test is not None:
        (job / "test_metrics.json").write_text(
            json.dumps({"split": "test", "metrics": test, "checkpoint": ""})
        )
    if ckpt is not None:
        (job / "checkpoints").mkdir()
        torch.save(ckpt, job / "checkpoints" / f"epoch{ckpt['epoch']:03d}.ckpt")
    return job


def scores(b4: float, cider: float) -> dict:
    return {"bleu1": 0.6, "bleu2": 0.4, "bleu3": 0.3, "bleu4": b4, "cider": cider}


def split_scores(b4: float) -> dict:
    return {
        "BLEU-1": 0.5,
        "BLEU-2": 0.3,
        "BLEU-3": 0.2,
        "BLEU-4": b4,
        "METEOR": None,
        "ROUGE-L": 0.4,
        "CIDEr": 0.7,
    }


def info(params: int, status: str = "completed", **kw) -> dict:
    return {
        "status": status,
        "params": params,
        "trainable_params": params,
        "train_time_s": 61.5,
        "best_epoch": kw.pop("best_epoch", None),
        "best_score": kw.pop("best_score", None),
        "wandb_run": {"id": f"run{params}"},
        **kw,
    }


@pytest.fixture
def sweep(tmp_path) -> Path:
    """2 x 2 grid: job 0 and 1 fine, job 2 logged to W&B only (no CSV), job 3 failed."""
    sweep = tmp_path / "2026-01-01_00-00-00"
    sweep.mkdir()
    task = ["debug=tiny", "decoder.hidden_dim=32,64", "decoder.attention_dim=16,32"]
    (sweep / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"overrides": {"task": task}}}))
    grid = [(h, a) for h in (32, 64) for a in (16, 32)]
    ov = [["debug=tiny", f"decoder.hidden_dim={h}", f"decoder.attention_dim={a}"] for h, a in grid]
    write_job(
        sweep,
        0,
        ov[0],
        epochs=[
            {"epoch": 0, **scores(0.10, 0.5)},
            {"epoch": 1, **scores(0.20, 0.9)},
            {"epoch": 2, **scores(0.20, 1.1)},
        ],  # a tie: epoch 1 stays
        info=info(1000),
        test=split_scores(0.18),
    )
    write_job(
        sweep,
        1,
        ov[1],
        epochs=[{"epoch": 0, **scores(0.25, 0.8)}, {"epoch": 1, **scores(0.15, 0.6)}],
        info=info(2000),
        test=split_scores(0.22),
    )
    metrics = {f"val/{k}": v for k, v in scores(0.3, 1.2).items()}
    write_job(
        sweep,
        2,
        ov[2],
        info=None,
        test=split_scores(0.28),
        ckpt={
            "epoch": 3,
            "state_dict": {"model.w": torch.zeros(7, 3), "other": torch.zeros(5)},
            "captioning": {"metrics": metrics},
        },
    )
    write_job(
        sweep,
        3,
        ov[3],
        epochs=[{"epoch": 0, **scores(0.05, 0.1)}],
        info=info(4000, status="failed", error="RuntimeError: out of memory"),
    )
    return sweep


def test_reads_every_job_with_what_it_left(sweep):
    s = report.read_sweep(sweep)
    assert s.swept == ["decoder.hidden_dim", "decoder.attention_dim"]
    jobs = {j.num: j for j in s.jobs}
    assert [j.status for j in s.jobs] == ["ok", "ok", "ok", "failed"]
    assert jobs[0].best_epoch == 1 and jobs[0].val["BLEU-4"] == 0.2 and jobs[0].val["CIDEr"] == 0.9
    assert jobs[1].best_epoch == 0 and jobs[1].best_score == 0.25
    assert jobs[0].test["BLEU-4"] == 0.18 and jobs[0].params == 1000
    # No CSV, no run_info.json: the best checkpoint's stored metrics and weights fill in.
    assert jobs[2].best_epoch == 3 and jobs[2].val["CIDEr"] == 1.2 and jobs[2].params == 21
    assert "out of memory" in jobs[3].note and jobs[3].val["BLEU-4"] == 0.05
    assert [j.num for j in s.ranked()] == [2, 1, 0, 3]
    # the Markdown counts epochs from 1, as the training log does; the records count from 0
    md = report.markdown(s, None)
    assert "at epoch 4;" in md  # job 2, the best: record 3
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert row0.split(" | ")[4] == "2"  # job, status, hidden_dim, attention_dim, best epoch


def test_writes_markdown_csv_and_plot(sweep):
    assert report.main([str(sweep)]) == 0
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    assert len(rows) == 4
    assert rows[3]["status"] == "failed" and "out of memory" in rows[3]["note"]
    assert rows[0]["decoder.hidden_dim"] == "32" and rows[0]["decoder.attention_dim"] == "16"
    assert float(rows[1]["val_bleu4"]) == 0.25 and float(rows[1]["test_cider"]) == 0.7
    assert rows[0]["train_time_s"] == "61.5" and rows[0]["wandb_run"] == "run1000"
    md = (sweep / "report.md").read_text()
    assert "**Best: job 2**" in md and "## Failed jobs" in md and "out of memory" in md
    assert "val CIDEr-D" in md and "![val/bleu4" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 4  # header + one row per job, the failed one included
    assert (sweep / "report.png").stat().st_size > 10_000


def test_without_matplotlib_the_table_is_written_without_its_figure(sweep, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    paths = report.write_report(sweep)
    assert set(paths) == {"csv", "md"} and not (sweep / "report.png").exists()
    assert "**Best: job 2**" in paths["md"].read_text()
    assert "pip install matplotlib" in caplog.text


def test_a_job_killed_mid_run_is_listed_as_failed(tmp_path):
    write_job(tmp_path, 0, ["optim.decoder_lr=0.001"], info=info(10, status="running"))
    write_job(tmp_path, 1, ["optim.decoder_lr=0.002"], info=info(10), test=split_scores(0.1))
    s = report.read_sweep(tmp_path)
    assert s.swept == ["optim.decoder_lr"]  # it varies between jobs, though no multirun.yaml
    assert s.jobs[0].status == "failed" and "killed" in s.jobs[0].note
    assert report.write_report(tmp_path)["png"].is_file()
    # not broken: the report says it is unfinished and that rerunning the sweep resumes it
    md = (tmp_path / "report.md").read_text()
    assert "1 finished, 1 unfinished, 0 failed" in md and "| 0 | unfinished |" in md
    assert "## Unfinished jobs" in md and "## Failed jobs" not in md


def test_optuna_params_count_as_swept(tmp_path):
    sweeper = {
        "params": {
            "optim.decoder_lr": "tag(log, interval(1e-4, 1e-2))",
            "decoder.dropout": "interval(0, 0.5)",
            "encoder": "efficientnet_lite2",  # one value: a fixed setting, not compared
        }
    }
    assert report.sweep_keys(tmp_path, sweeper) == ["optim.decoder_lr", "decoder.dropout"]


def test_sweep_syntax_is_recognised():
    assert _is_sweep("a=1,2") and _is_sweep("+b=range(1,3)")
    assert not _is_sweep("a=1") and not _is_sweep("logger=wandb")
    assert report.override_key("+decoder.hidden_dim=64") == "decoder.hidden_dim"


def test_cli_rejects_a_directory_without_jobs(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "no Hydra jobs" in capsys.readouterr().err


def test_degenerate_jobs_are_marked_and_categories_are_not_joined(tmp_path):
    """Two encoders (a category: no order between them); one job says the same thing always."""
    for num, (encoder, b4) in enumerate([("resnet18", 0.21), ("small_cnn", 0.0)]):
        job = write_job(
            tmp_path,
            num,
            [f"encoder={encoder}"],
            epochs=[{"epoch": 0, **scores(max(b4, 0.0), 0.4)}],
            info=info(10, best_epoch=0, best_score=b4),
            test=split_scores(b4),
        )
        same = num == 1
        preds = [{"image_id": i, "caption": "a a a" if same else f"a dog {i}"} for i in range(5)]
        (job / "test_predictions.json").write_text(json.dumps(preds))
    s = report.read_sweep(tmp_path)
    assert [j.status for j in s.jobs] == ["ok", "degenerate"]
    assert "all 5 test captions are 'a a a'" in s.jobs[1].note
    paths = report.write_report(tmp_path)
    md = paths["md"].read_text()
    assert "1 degenerate" in md and "## Degenerate jobs" in md and "**Best: job 0**" in md
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["status"] for r in rows] == ["ok", "degenerate"]

    fig = report.figure(s)
    by_encoder = fig.axes[0]
    assert by_encoder.get_xlabel() == "encoder"
    joined = [line for line in by_encoder.get_lines() if len(line.get_xdata()) > 1]
    assert not joined  # no line between two names
    assert [t.get_text() for t in by_encoder.get_xticklabels()] == ["resnet18", "small_cnn"]


def test_a_zero_bleu4_alone_marks_a_job_degenerate(tmp_path):
    write_job(tmp_path, 0, ["seed=1"], info=info(10), test=split_scores(0.0))
    job = report.read_sweep(tmp_path).jobs[0]
    assert job.status == "degenerate" and "test BLEU-4 0.0e+00" in job.note


def test_every_metric_epochs_and_time_per_epoch_are_in_the_table(sweep):
    s = report.read_sweep(sweep)
    jobs = {j.num: j for j in s.jobs}
    assert jobs[0].epochs == 3 and jobs[0].epoch_time_s == pytest.approx(61.5 / 3)
    assert jobs[0].test["ROUGE-L"] == 0.4 and jobs[0].test["METEOR"] is None
    assert jobs[0].curve == [(0, 0.5), (1, 0.9), (2, 1.1)]
    md = report.markdown(s, None)
    header = next(line for line in md.splitlines() if line.startswith("| job"))
    assert "test METEOR" in header and "test ROUGE-L" in header and "time/epoch" in header
    assert "val METEOR" not in header  # validation never computes it: no empty column
    row0 = next(line for line in md.splitlines() if line.startswith("| 0 |"))
    assert "| 3 | 20s | 1m02s |" in row0  # epochs, time per epoch, train time


def test_grouped_test_bars_and_validation_curves(sweep):
    paths = report.write_report(sweep)
    assert paths["test_png"].stat().st_size > 10_000 and paths["curves_png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert "![test CIDEr-D per job](report_test.png)" in md
    assert "![validation CIDEr-D per epoch](report_curves.png)" in md
    s = report.read_sweep(sweep)
    fig = report.scores_figure(s)
    ax = fig.axes[0]
    # a group per hidden_dim (the outer setting), a colour per attention_dim (the inner one)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["32", "64"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["16", "32"]
    heights = sorted(round(p.get_height(), 3) for p in ax.patches)
    assert heights == [0.0, 0.7, 0.7, 0.7]  # three tested jobs, the failed one at zero
    curves = report.curves_figure(s).axes[0]
    lines = {ln.get_label(): list(ln.get_ydata()) for ln in curves.get_lines()}
    assert lines["32, 16"] == [0.5, 0.9, 1.1] and lines["64, 32 (failed)"] == [0.1]
    assert "64, 16" not in lines  # job 2 logged no CSV: no curve to draw
    # a line has the colour of its inner setting's bars and the style of its outer setting
    bar_colour = {
        t.get_text(): tuple(p.get_facecolor()[:3])
        for t, p in zip(ax.get_legend().get_texts(), ax.get_legend().get_patches(), strict=True)
    }
    line = {ln.get_label(): ln for ln in curves.get_lines()}
    assert matplotlib.colors.to_rgb(line["32, 16"].get_color()) == bar_colour["16"]
    assert matplotlib.colors.to_rgb(line["64, 32 (failed)"].get_color()) == bar_colour["32"]
    assert line["32, 16"].get_linestyle() != line["64, 32 (failed)"].get_linestyle()


def test_docs_get_the_table_and_figures_between_their_markers(sweep, tmp_path):
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text(
        "# Results\n\nbefore\n<!-- sweep:grid:begin -->\nold table\n<!-- sweep:grid:end -->\nafter\n"
    )
    assert report.main([str(sweep), "--docs", str(docs), "--name", "grid"]) == 0
    text = docs.read_text()
    assert text.startswith("# Results\n\nbefore\n<!-- sweep:grid:begin -->")
    assert text.endswith("<!-- sweep:grid:end -->\nafter\n") and "old table" not in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 4  # header + every job, the failed one with its error
    assert "failed: RuntimeError: out of memory" in rows[4]
    assert rows[1].startswith("| 32 | 16 | 2 | 0.200 | 0.900 | 0.500 | 0.180 |")  # epoch from 1
    for name in ("grid_test.png", "grid_curves.png"):
        assert (docs.parent / "sweeps" / name).stat().st_size > 10_000
        assert f"](sweeps/{name})" in text
    # again: the block is replaced, not repeated
    assert report.main([str(sweep), "--docs", str(docs), "--name", "grid"]) == 0
    assert docs.read_text() == text


def test_docs_without_markers_is_an_error(sweep, tmp_path, capsys):
    docs = tmp_path / "results.md"
    docs.write_text("# Results\n")
    assert report.main([str(sweep), "--docs", str(docs)]) == 2
    assert "<!-- sweep:" in capsys.readouterr().err and docs.read_text() == "# Results\n"


def test_a_job_stopped_by_a_signal_is_shown_as_resumable(tmp_path):
    write_job(tmp_path, 0, ["decoder=merge"], info=info(10), test=split_scores(0.1))
    stopped = info(10, status="interrupted", error="TrainingInterrupted: SIGTERM: stopped")
    write_job(tmp_path, 1, ["decoder=show_tell"], info={**stopped, "epochs": 1})
    write_job(tmp_path, 2, ["decoder=soft_attention"], info=info(10, status="running"))
    write_job(tmp_path, 3, ["decoder=updown"], info=info(10, status="failed", error="OSError: x"))
    s = report.read_sweep(tmp_path)
    table = report.docs_table(s)
    assert (
        "| show_tell | not finished (1 epoch(s) so far); rerunning the sweep resumes it |" in table
    )
    assert "| soft_attention | not finished (0 epoch(s) so far);" in table  # running, or killed
    assert "| updown | failed: OSError: x |" in table  # broken: its error
    bars = report.scores_figure(s).axes[0]
    assert "unfinished" in [t.get_text() for t in bars.texts]
