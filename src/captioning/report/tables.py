"""Tables of a sweep: the report's Markdown and CSV, and the compact table of a results page."""

import csv
from pathlib import Path
from typing import Any

from .jobs import LOGGED, METRICS, Job, Sweep, _float, _stopped

SHOWN = {m: "CIDEr-D" if m == "CIDEr" else m for m in METRICS}  # our CIDEr is CIDEr-D


def _fmt(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _fmt_params(n: int | None) -> str:
    if n is None:
        return ""
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def _fmt_time(s: float | None) -> str:
    if s is None:
        return ""
    m, s = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _epoch(job: Job) -> str:
    """The best epoch counted from 1, as the training log and the curves count it (Lightning,
    run_info.json, report.csv and the checkpoint names count from 0)."""
    return "" if job.best_epoch is None else str(job.best_epoch + 1)


def csv_rows(sweep: Sweep) -> list[dict[str, Any]]:
    """One row per job, in job order, with full-precision numbers."""
    rows = []
    for j in sweep.jobs:
        row: dict[str, Any] = {"job": j.num, "status": j.status}
        row |= {k: j.overrides.get(k, "") for k in sweep.swept}
        row |= {"monitor": j.monitor, "best_epoch": j.best_epoch, "best_score": j.best_score}
        row |= {f"val_{LOGGED[m]}": j.val.get(m) for m in METRICS}
        row |= {f"test_{LOGGED[m]}": j.test.get(m) for m in METRICS}
        row |= {
            "params": j.params,
            "trainable_params": j.trainable_params,
            "train_time_s": j.train_time_s,
            "epochs": j.epochs,
            "epoch_time_s": j.epoch_time_s,
            "wandb_run": j.wandb_run or "",
            "dir": str(j.dir),
            "note": j.note,
        }
        rows.append({k: "" if v is None else v for k, v in row.items()})
    return rows


def write_csv(sweep: Sweep, path: Path) -> None:
    rows = csv_rows(sweep)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["job"])
        writer.writeheader()
        writer.writerows(rows)


def _short(value: str) -> str:
    """An Optuna-sampled 0.0004429649570464294 reads as 0.000443; other values stay as given."""
    try:
        x = float(value)
    except ValueError:
        return value
    return value if x.is_integer() or len(value) <= 8 else f"{x:.3g}"


def _settings(job: Job, keys: list[str]) -> str:
    return ", ".join(f"{k}={_short(job.overrides.get(k, ''))}" for k in keys) or "(defaults)"


def markdown(sweep: Sweep, plot_name: str | None, figures: dict[str, str] | None = None) -> str:
    """The report; `plot_name` and `figures` ({title: file name}) are the PNGs beside it."""
    ok = [j for j in sweep.jobs if j.status == "ok"]
    useless = [j for j in sweep.jobs if j.status == "degenerate"]
    # a job stopped mid-run (a signal, a killed or still running process) is not broken:
    # rerunning the sweep resumes it
    stopped = [j for j in sweep.jobs if _stopped(j)]
    failed = [j for j in sweep.jobs if j.status == "failed" and not _stopped(j)]
    lines = [
        f"# Sweep report: {sweep.dir.name}",
        "",
        f"`{sweep.dir}`: {len(sweep.jobs)} jobs, {len(ok) + len(useless)} finished"
        + (f" ({len(useless)} degenerate)" if useless else "")
        + (f", {len(stopped)} unfinished" if stopped else "")
        + f", {len(failed)} failed. "
        f"Selection metric: `{sweep.monitor}` (validation, best epoch; higher is better). "
        f"Swept: {', '.join(f'`{k}`' for k in sweep.swept) or 'nothing'}.",
        "",
    ]
    ranked = sweep.ranked()
    if ranked and ranked[0].status == "ok" and ranked[0].best_score is not None:
        b = ranked[0]
        lines += [
            f"**Best: {b.label}** ({_settings(b, sweep.swept)}): {sweep.monitor} "
            f"{_fmt(b.best_score)} at epoch {_epoch(b)}; test BLEU-4 {_fmt(b.test.get('BLEU-4'))}"
            f", CIDEr-D {_fmt(b.test.get('CIDEr'))}.",
            "",
        ]
    if sweep.optuna and "best_params" in sweep.optuna:
        params = ", ".join(f"{k}={_short(str(v))}" for k, v in sweep.optuna["best_params"].items())
        value = _fmt(_float(sweep.optuna.get("best_value")))
        lines += [f"Optuna's best trial: {params} (value {value}).", ""]
    for title, name in (figures or {}).items():
        lines += [f"![{title}]({name})", ""]
    if plot_name:
        lines += [f"![{sweep.monitor} against the swept settings]({plot_name})", ""]
    # validation skips METEOR (Java is slow): a column nobody filled is left out
    val_metrics = [m for m in METRICS if any(j.val.get(m) is not None for j in sweep.jobs)]
    header = (
        ["job", "status", *[f"`{k}`" for k in sweep.swept], "best epoch"]
        + [f"val {SHOWN[m]}" for m in val_metrics]
        + [f"test {SHOWN[m]}" for m in METRICS]
        + ["params", "epochs", "time/epoch", "train time"]
    )
    lines += [
        "Jobs, best first (validation scores at each job's best epoch, epochs counted from 1 as"
        " the training log and the curves count them):",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for j in ranked:
        cells = [
            str(j.num),
            "unfinished" if _stopped(j) else j.status,
            *[_short(j.overrides.get(k, "")) for k in sweep.swept],
            _epoch(j),
        ]
        cells += [_fmt(j.val.get(m)) for m in val_metrics]
        cells += [_fmt(j.test.get(m)) for m in METRICS]
        cells += [
            _fmt_params(j.params),
            "" if j.epochs is None else str(j.epochs),
            _fmt_time(j.epoch_time_s),
            _fmt_time(j.train_time_s),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if useless:
        lines += ["", "## Degenerate jobs", ""]
        lines += [
            f"- {j.label} ({_settings(j, sweep.swept)}): {j.note}  `{j.dir}`" for j in useless
        ]
    if stopped:
        lines += ["", "## Unfinished jobs", "", "Rerunning the sweep's command resumes them.", ""]
        lines += [
            f"- {j.label} ({_settings(j, sweep.swept)}): {j.note}  `{j.dir}`" for j in stopped
        ]
    if failed:
        lines += ["", "## Failed jobs", ""]
        lines += [f"- {j.label} ({_settings(j, sweep.swept)}): {j.note}  `{j.dir}`" for j in failed]
    lines += ["", "Columns, full precision, W&B runs and directories: `report.csv`.", ""]
    return "\n".join(lines)


def docs_table(sweep: Sweep) -> str:
    """The compact table of a results page: settings, the best epoch's val CIDEr-D and BLEU-4,
    test scores, size and time per epoch; jobs in job order, failed ones with their error."""
    header = (
        [f"`{k}`" for k in sweep.swept]
        + ["best epoch", "val BLEU-4", "val CIDEr-D"]
        + [f"test {SHOWN[m]}" for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")]
        + ["params", "time/epoch"]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for j in sweep.jobs:
        settings = [_short(j.overrides.get(k, "")) for k in sweep.swept]
        if j.status == "failed":
            if _stopped(j):
                note = f"not finished ({j.epochs or 0} epoch(s) so far); rerunning the sweep resumes it"
            else:
                why = j.note.replace("|", "/")[:120]
                note = why if why.startswith("failed") else f"failed: {why}"
            lines.append("| " + " | ".join(settings + [note] + [""] * 9) + " |")
            continue
        cells = settings + [
            _epoch(j),
            _fmt(j.val.get("BLEU-4"), 3),
            _fmt(j.val.get("CIDEr"), 3),
        ]
        cells += [
            _fmt(j.test.get(m), 3) for m in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")
        ]
        cells += [_fmt_params(j.trainable_params or j.params), _fmt_time(j.epoch_time_s)]
        if j.status == "degenerate":
            cells[len(settings)] += " (degenerate)"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
