"""Compare the jobs of a Hydra multirun: `python -m captioning.report <multirun dir>`.

Writes report.md, report.csv and report.png into the multirun directory: one row per job with
its swept settings, validation scores at the best epoch, test scores, size and training time.
Failed jobs stay in the table with whatever they left behind.

- `jobs`: read each job's records (Hydra's overrides and config, the metrics CSV, run_info.json,
  test_metrics.json, the best checkpoint as a fallback) into `Job`s and a `Sweep`
- `tables`: the report's Markdown and CSV, and the compact table of a results page
- `figures`: the report's figures (matplotlib, imported only when a figure is drawn)
- `docs`: splice the table and figures into a Markdown page (`--docs FILE --name NAME`)

Here: `write_report`, the Hydra callback `SweepReport` and the command line (`main`, run by
`__main__`). The public names of the modules above are importable from here.
"""

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from .docs import write_docs
from .figures import _save, curves_figure, figure, plot, scores_figure
from .jobs import (
    CURVE,
    DEGENERATE_BLEU4,
    LOGGED,
    METRICS,
    Job,
    Sweep,
    best_val_from_csv,
    curve_from_csv,
    degenerate,
    find_jobs,
    from_checkpoint,
    override_key,
    override_value,
    read_job,
    read_sweep,
    sweep_keys,
)
from .tables import SHOWN, csv_rows, docs_table, markdown, write_csv

__all__ = [
    "CURVE",
    "DEGENERATE_BLEU4",
    "LOGGED",
    "METRICS",
    "SHOWN",
    "Job",
    "Sweep",
    "SweepReport",
    "best_val_from_csv",
    "csv_rows",
    "curve_from_csv",
    "curves_figure",
    "degenerate",
    "docs_table",
    "figure",
    "find_jobs",
    "from_checkpoint",
    "main",
    "markdown",
    "override_key",
    "override_value",
    "plot",
    "read_job",
    "read_sweep",
    "scores_figure",
    "sweep_keys",
    "write_csv",
    "write_docs",
    "write_report",
]

log = logging.getLogger(__name__)


def write_report(sweep_dir: Path, out_dir: Path | None = None) -> dict[str, Path]:
    """Write report.md, report.csv and the figures (report.png: the selection metric against each
    setting; report_test.png: test CIDEr-D in grouped bars; report_curves.png: val CIDEr-D per
    epoch); returns the paths written."""
    sweep = read_sweep(sweep_dir)
    out = Path(out_dir or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "report.csv", "md": out / "report.md", "png": out / "report.png"}
    write_csv(sweep, paths["csv"])
    has_plot = plot(sweep, paths["png"])
    if not has_plot:
        paths.pop("png")
    figures = {}
    if has_plot:  # matplotlib is there
        extra = {
            "test_png": ("report_test.png", "test CIDEr-D per job", scores_figure),
            "curves_png": ("report_curves.png", "validation CIDEr-D per epoch", curves_figure),
        }
        for key, (name, title, make) in extra.items():
            if _save(make(sweep), out / name):
                paths[key] = out / name
                figures[title] = name
    paths["md"].write_text(markdown(sweep, paths["png"].name if has_plot else None, figures))
    return paths


class SweepReport(Callback):
    """Hydra callback: write the report when a multirun ends (`hydra.callbacks.sweep_report`).

    A sweep whose job raised never gets here (Hydra re-raises first): run the command then.
    """

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            paths = write_report(sweep_dir)
        except Exception as e:  # the jobs' results matter more than their summary
            log.warning("no sweep report (python -m captioning.report %s): %s", sweep_dir, e)
            return
        log.info("sweep report: %s", paths["md"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m captioning.report",
        description="Compare the jobs of a multirun: writes report.md, report.csv, report.png.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the multirun directory (hydra.sweep.dir)")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: sweep_dir)"
    )
    parser.add_argument(
        "--docs",
        type=Path,
        default=None,
        help="also write the table and figures into this Markdown file, between "
        "<!-- sweep:NAME:begin --> and <!-- sweep:NAME:end -->",
    )
    parser.add_argument("--name", default=None, help="NAME for --docs (default: the folder's)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: no such directory: {args.sweep_dir}", file=sys.stderr)
        return 2
    if not find_jobs(args.sweep_dir):
        print(
            f"error: no Hydra jobs (*/.hydra/overrides.yaml) under {args.sweep_dir}",
            file=sys.stderr,
        )
        return 2
    for path in write_report(args.sweep_dir, args.out).values():
        print(path)
    if args.docs is not None:
        try:
            written = write_docs(args.sweep_dir, args.docs, args.name or args.sweep_dir.name)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in written:
            print(path)
    return 0
