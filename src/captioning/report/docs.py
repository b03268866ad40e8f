"""Splice a sweep's table and figures into a Markdown page (`python -m captioning.report --docs`),
between `<!-- sweep:NAME:begin -->` and `<!-- sweep:NAME:end -->`."""

import math
from pathlib import Path

from .figures import _save, curves_figure, scores_figure
from .jobs import _load_yaml, read_sweep
from .tables import docs_table


def _planned_jobs(sweep_dir: Path) -> int | None:
    """How many jobs the sweep's grid has (multirun.yaml's basic-sweeper params), if known."""
    try:
        params = _load_yaml(Path(sweep_dir) / "multirun.yaml")["hydra"]["sweeper"]["params"]
        return math.prod(len(str(v).split(",")) for v in (params or {}).values()) or None
    except Exception:
        return None


def write_docs(sweep_dir: Path, docs: Path, name: str) -> list[Path]:
    """Splice the sweep's table between `<!-- sweep:NAME:begin -->` and `<!-- sweep:NAME:end -->`
    in `docs` and put its figures beside it (docs/sweeps/NAME_test.png, NAME_curves.png).
    Returns the files written."""
    begin, end = f"<!-- sweep:{name}:begin -->", f"<!-- sweep:{name}:end -->"
    text = docs.read_text()
    if begin not in text or end not in text:
        raise ValueError(f"{docs} has no {begin} ... {end} lines to write between")
    sweep = read_sweep(sweep_dir)
    figures_dir = docs.parent / "sweeps"
    figures_dir.mkdir(exist_ok=True)
    written, images = [docs], []
    for suffix, title, make in (
        ("test", "test CIDEr-D per job", scores_figure),
        ("curves", "validation CIDEr-D per epoch", curves_figure),
    ):
        path = figures_dir / f"{name}_{suffix}.png"
        try:
            saved = _save(make(sweep), path)
        except ImportError:  # no matplotlib: the table alone
            saved = False
        if saved:
            written.append(path)
            images.append(f"![{title}]({path.relative_to(docs.parent).as_posix()})")
    done = sum(j.status != "failed" for j in sweep.jobs)
    total = _planned_jobs(sweep_dir) or len(sweep.jobs)
    block = [
        begin,
        "",
        f"{total} jobs, {done} finished, in `{sweep_dir}`; written by "
        f"`python -m captioning.report {sweep_dir} --docs {docs} --name {name}`. Selection: "
        f"`{sweep.monitor}` on val (the best epoch's checkpoint is tested; epochs counted from "
        "1, as the training log and the curves count them); params: trained ones.",
        "",
        docs_table(sweep),
        "",
        *[line for image in images for line in (image, "")],
        end,
    ]
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    docs.write_text(head + "\n".join(block) + tail)
    return written
