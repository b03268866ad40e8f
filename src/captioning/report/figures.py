"""Figures of a sweep. matplotlib is imported only when a figure is drawn: without it the
tables are still written."""

import logging
import math
from pathlib import Path

from .jobs import CURVE, Job, Sweep, _stopped
from .tables import SHOWN, _short

log = logging.getLogger(__name__)


def _numeric(values: list[str]) -> list[float] | None:
    try:
        return [float(v) for v in values]
    except ValueError:
        return None


def plot(sweep: Sweep, path: Path) -> bool:
    """Write `figure(sweep)` to `path`; False if there is nothing to plot."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the table and the CSV matter more than the figure
        log.warning("report.png skipped: it needs matplotlib (pip install matplotlib)")
        return False
    fig = figure(sweep)
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def figure(sweep: Sweep):
    """Selection metric against each swept setting, plus one bar per job; None if nothing ran.

    A numeric setting is an axis with an order: points, and a line through the mean at each
    value. Any other setting (an encoder's name) has no order between its values, so its means
    are short bars, never joined by a line. Degenerate jobs are drawn apart (red crosses).
    """
    scored = [j for j in sweep.jobs if j.status != "failed" and j.best_score is not None]
    if not sweep.jobs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(sweep.swept) + 1
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = list(axes.flat)
    good = [j for j in scored if j.status == "ok"]
    for ax, key in zip(flat, sweep.swept, strict=False):
        values = [j.overrides.get(key, "") for j in scored]
        nums = _numeric(values)
        if nums is not None:
            x_of = dict(zip(values, nums, strict=True))
            levels = sorted(set(nums))
        else:
            names = sorted(set(values))
            x_of = {v: float(names.index(v)) for v in names}
            levels = [x_of[v] for v in names]
        x_good = [x_of[j.overrides.get(key, "")] for j in good]
        y_good = [j.best_score for j in good]
        ax.scatter(x_good, y_good, alpha=0.7, label="job")
        bad = [j for j in scored if j.status == "degenerate"]
        if bad:
            x_bad = [x_of[j.overrides.get(key, "")] for j in bad]
            ax.scatter(
                x_bad, [j.best_score for j in bad], marker="x", color="C3", label="degenerate"
            )
        at = [lv for lv in levels if lv in x_good]
        means = [
            sum(y for x, y in zip(x_good, y_good, strict=True) if x == lv) / x_good.count(lv)
            for lv in at
        ]
        if nums is not None:
            ax.plot(at, means, "-", color="C1", label="mean")
            if levels and levels[0] > 0 and levels[-1] / levels[0] >= 20:
                ax.set_xscale("log")
            if len(levels) <= 8 and ax.get_xscale() == "linear":
                ax.set_xticks(levels)
        else:
            ax.scatter(at, means, marker="_", s=900, linewidths=2, color="C1", label="mean")
            ax.set_xticks(levels, names, rotation=20, ha="right")
            ax.set_xlim(-0.6, len(names) - 0.4)
        ax.set_xlabel(key)
        ax.set_ylabel(sweep.monitor)
        ax.grid(alpha=0.3)
    if scored and sweep.swept:  # one legend for the setting panels, above them: never on a point
        fig.legend(*flat[0].get_legend_handles_labels(), loc="upper left", ncol=3, fontsize=8)
    ax = flat[len(sweep.swept)]
    # Bars named by their settings when those are short, by job number otherwise.
    settings = [", ".join(_short(j.overrides.get(k, "")) for k in sweep.swept) for j in sweep.jobs]
    short = all(len(t) <= 20 for t in settings) and len(sweep.jobs) <= 12
    labels = [
        f"{j.num}\n{t}" if short else str(j.num) for j, t in zip(sweep.jobs, settings, strict=True)
    ]
    heights = [
        j.best_score if j.status != "failed" and j.best_score is not None else 0.0
        for j in sweep.jobs
    ]
    color = {"ok": "C0", "degenerate": "C1"}
    # positions, not the labels, on the axis: job numbers as strings would make matplotlib
    # log that it reads numbers as categories
    xs = list(range(len(labels)))
    colors = ["C7" if _stopped(j) else color.get(j.status, "C3") for j in sweep.jobs]
    bars = ax.bar(xs, heights, color=colors)
    ax.set_xticks(xs, labels)
    for bar, j in zip(bars, sweep.jobs, strict=True):
        if j.status == "failed":
            text = "unfinished" if _stopped(j) else "failed"
        elif j.best_score is None:
            text = "?"
        else:
            text = f"{j.best_score:.3g}" + ("\ndegenerate" if j.status == "degenerate" else "")
        _label_bar(ax, bar, text, color=bar.get_facecolor())
    ax.set_xlabel(f"job: {', '.join(sweep.swept)}" if short else "job (settings in report.md)")
    ax.set_ylabel(sweep.monitor)
    ax.set_title("per job", fontsize=9)
    ax.margins(y=0.15)  # room for the labels above the bars
    for extra in flat[n:]:
        extra.axis("off")
    fig.suptitle(f"{sweep.dir.name}: best {sweep.monitor} per job", fontsize=10)
    fig.tight_layout()
    return fig


def _label_bar(ax, bar, text: str, **style) -> None:
    """`text` centred just above `bar`."""
    x = bar.get_x() + bar.get_width() / 2
    ax.annotate(text, (x, bar.get_height()), ha="center", va="bottom", fontsize=7, **style)


def _label(job: Job, keys: list[str]) -> str:
    """A job named by its swept values ("efficientnet_lite0, merge"), else by its number."""
    values = [_short(job.overrides.get(k, "")) for k in keys]
    return ", ".join(v for v in values if v) or job.label


def scores_figure(sweep: Sweep, metric: str = "CIDEr"):
    """Test `metric` in grouped bars: one group per value of the swept settings but the last,
    one colour per value of the last (sweep 1: a group per encoder, a bar per decoder).
    None when no job has a test score."""
    scored = [j for j in sweep.jobs if j.test.get(metric) is not None]
    if not scored or not sweep.swept:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    *outer, inner = sweep.swept
    groups = list(dict.fromkeys(_label(j, outer) if outer else "" for j in sweep.jobs))
    colours = list(dict.fromkeys(_short(j.overrides.get(inner, "")) for j in sweep.jobs))
    width = 0.8 / len(colours)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 + 0.55 * len(groups) * len(colours)), 3.8))
    for c, value in enumerate(colours):
        xs, heights, jobs = [], [], []
        for g, group in enumerate(groups):
            for j in sweep.jobs:
                same_group = (_label(j, outer) if outer else "") == group
                if same_group and _short(j.overrides.get(inner, "")) == value:
                    xs.append(g + (c - (len(colours) - 1) / 2) * width)
                    heights.append(j.test.get(metric) or 0.0)
                    jobs.append(j)
        bars = ax.bar(xs, heights, width * 0.95, label=value, color=f"C{c}")
        for bar, j in zip(bars, jobs, strict=True):
            text = (
                ("unfinished" if _stopped(j) else "failed")
                if j.status == "failed"
                else f"{j.test[metric]:.3f}"
                if j.test.get(metric) is not None
                else "-"
            )
            if j.status == "degenerate":
                text += "\n(degenerate)"
            _label_bar(ax, bar, text)
    ax.set_xticks(range(len(groups)), groups if outer else [""])
    if outer:
        ax.set_xlabel(", ".join(outer))
    ax.set_ylabel(f"test {SHOWN.get(metric, metric)}")
    ax.margins(y=0.12)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(  # beside the axes: inside it would hide a short bar or its label
        title=inner, fontsize=8, title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1)
    )
    ax.set_title(f"{sweep.dir.name}: test {SHOWN.get(metric, metric)} per job", fontsize=10)
    fig.tight_layout()
    return fig


def curves_figure(sweep: Sweep):
    """Validation CIDEr-D per epoch, one line per job (its swept values in the legend)."""
    jobs = [j for j in sweep.jobs if j.curve]
    if not jobs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    styles = ["-", "--", ":", "-."]

    def value(j: Job, key: str) -> str:
        return _short(j.overrides.get(key, ""))

    # The colour follows the last swept setting, as in the bars of `scores_figure` (sweep 1: a
    # colour per decoder), the line style the first (a style per encoder); with one swept
    # setting, or none, every job has its own colour.
    keys = sweep.swept
    colour_key = keys[-1] if keys else None
    style_key = keys[0] if len(keys) > 1 else None
    colours = list(dict.fromkeys(value(j, colour_key) for j in sweep.jobs)) if colour_key else []
    style_values = list(dict.fromkeys(value(j, style_key) for j in jobs)) if style_key else []
    for i, j in enumerate(jobs):
        colour = colours.index(value(j, colour_key)) if colour_key else i
        style = styles[style_values.index(value(j, style_key)) % len(styles)] if style_key else "-"
        epochs = [e + 1 for e, _ in j.curve]
        state = "unfinished" if _stopped(j) else j.status
        label = _label(j, sweep.swept) + (f" ({state})" if state != "ok" else "")
        ax.plot(
            epochs,
            [v for _, v in j.curve],
            style,
            marker="o",
            ms=3,
            color=f"C{colour % 10}",
            label=label,
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"val CIDEr-D ({CURVE})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.set_title(f"{sweep.dir.name}: validation CIDEr-D per epoch", fontsize=10)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> bool:
    if fig is None:
        return False
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True
