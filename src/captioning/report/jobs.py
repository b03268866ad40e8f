"""Read what the jobs of a Hydra multirun left behind: a `Job` per job directory, a `Sweep`.

A job reads as whatever it left behind, so a failed one still has a row in the report. Each job
directory is read as train.py leaves it:

    .hydra/overrides.yaml, .hydra/config.yaml   the job's settings (Hydra writes them)
    csv/metrics.csv                             validation scores per epoch (the CSV logger)
    checkpoints/*.ckpt                          scores stored with the best checkpoint (fallback)
    run_info.json                               size, training time, best epoch, status (RunInfo)
    test_metrics.json                           test scores of the best checkpoint
    test_predictions.json                       its captions (a degenerate job: all the same)

A job that finished but whose captions are useless is marked degenerate: every test caption the
same, or BLEU-4 of zero (not one 4-gram of any caption in the references), which n-gram scores
alone would show as an ordinary low number.
"""

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import LOG_NAMES, METRIC_KEYS

METRICS = METRIC_KEYS
LOGGED = (
    LOG_NAMES  # metric -> the name train.py logs it under (val/<name>; validation skips METEOR)
)
CURVE = "val/cider"  # the per-epoch curve of every job in report_curves.png


# -- reading Hydra's records ----------------------------------------------------------------------
def override_key(override: str) -> str:
    """`+decoder.hidden_dim=64` -> `decoder.hidden_dim`."""
    return override.split("=", 1)[0].lstrip("+~")


def override_value(override: str) -> str:
    return override.split("=", 1)[1] if "=" in override else ""


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).is_sweep_override()
    except Exception:  # not Hydra's grammar: guess from the sweep syntax
        value = override_value(override)
        return "," in value or value.startswith(("range(", "choice(", "interval(", "glob("))


def _load_yaml(path: Path) -> Any:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def sweep_keys(sweep_dir: Path, sweeper: dict[str, Any] | None = None) -> list[str]:
    """Keys a sweep declared: `a=1,2` overrides in multirun.yaml, `hydra.sweeper.params` keys."""
    keys: list[str] = []
    multirun = Path(sweep_dir) / "multirun.yaml"  # the basic sweeper writes it; Optuna does not
    if multirun.is_file():
        task = (_load_yaml(multirun).get("hydra") or {}).get("overrides", {}).get("task") or []
        keys += [override_key(o) for o in task if _is_sweep(o)]
    # a key given one value (a fixed setting of the sweep) is not what the sweep compares
    params = (sweeper or {}).get("params") or {}
    keys += [str(k) for k, v in params.items() if _is_sweep(f"{k}={v}")]
    return list(dict.fromkeys(k for k in keys if not k.startswith("hydra.")))


# -- one job ------------------------------------------------------------------------------------
@dataclass
class Job:
    """What one multirun job left behind."""

    num: int
    dir: Path
    overrides: dict[str, str]
    monitor: str = "val/bleu4"
    status: str = "ok"  # ok | degenerate (finished, but its captions are useless) | failed
    note: str = ""
    best_epoch: int | None = None
    best_score: float | None = None  # the selection metric (monitor) at the best epoch
    val: dict[str, float | None] = field(default_factory=dict)
    test: dict[str, float | None] = field(default_factory=dict)
    params: int | None = None
    trainable_params: int | None = None
    train_time_s: float | None = None
    epochs: int | None = None  # epochs trained
    curve: list[tuple[int, float]] = field(default_factory=list)  # (epoch, CURVE) per validation
    wandb_run: str | None = None

    @property
    def epoch_time_s(self) -> float | None:
        if self.train_time_s is None or not self.epochs:
            return None
        return self.train_time_s / self.epochs

    @property
    def label(self) -> str:
        return f"job {self.num}"


def _float(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def best_val_from_csv(
    path: Path, monitor: str
) -> tuple[int | None, float | None, dict[str, float | None]]:
    """Epoch, monitor value and validation scores of the first epoch with the best (max) value."""
    best: tuple[float, int | None, dict[str, float | None]] | None = None
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            score = _float(row.get(monitor))
            if score is None or (best is not None and score <= best[0]):
                continue  # a tie keeps the earlier epoch, as ModelCheckpoint does
            epoch = _float(row.get("epoch"))
            val = {m: _float(row.get(f"val/{LOGGED[m]}")) for m in METRICS}
            best = (score, int(epoch) if epoch is not None else None, val)
    return (best[1], best[0], best[2]) if best else (None, None, {})


def curve_from_csv(path: Path, key: str = CURVE) -> list[tuple[int, float]]:
    """(epoch, value) of every row that logged `key`: one per validation."""
    points = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            value, epoch = _float(row.get(key)), _float(row.get("epoch"))
            if value is not None and epoch is not None:
                points.append((int(epoch), value))
    return points


def _best_checkpoint(job_dir: Path, test: dict[str, Any]) -> Path | None:
    path = Path(test.get("checkpoint") or "")
    for candidate in (path, job_dir / "checkpoints" / path.name):  # the sweep may have moved
        if path.name and candidate.is_file():
            return candidate
    # save_top_k=1 (the default) leaves one besides last.ckpt; with more, the newest is taken.
    ckpts = sorted(p for p in (job_dir / "checkpoints").glob("*.ckpt") if p.name != "last.ckpt")
    return ckpts[-1] if ckpts else None


def from_checkpoint(path: Path) -> dict[str, Any]:
    """Epoch, stored metrics and parameter count of a checkpoint train.py wrote."""
    import torch

    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    info = ckpt.get("captioning") or {}
    state = ckpt.get("state_dict") or {}
    return {
        "epoch": ckpt.get("epoch"),
        "metrics": info.get("metrics") or {},
        "params": sum(v.numel() for k, v in state.items() if k.startswith("model.")) or None,
    }


def read_job(job_dir: Path) -> Job:
    """Everything known about one job; never raises for missing or broken files."""
    job_dir = Path(job_dir)
    hydra_dir = job_dir / ".hydra"
    problems = []
    try:
        overrides = [str(o) for o in _load_yaml(hydra_dir / "overrides.yaml") or []]
    except Exception as e:
        overrides = []
        problems.append(f"unreadable .hydra/overrides.yaml: {e}")
    try:
        num = int(_load_yaml(hydra_dir / "hydra.yaml")["hydra"]["job"]["num"])
    except Exception:
        num = int(job_dir.name) if job_dir.name.isdigit() else -1
    try:
        config = _load_yaml(hydra_dir / "config.yaml")
    except Exception:
        config = {}
    job = Job(
        num=num,
        dir=job_dir,
        overrides={override_key(o): override_value(o) for o in overrides},
        monitor=str(config.get("monitor") or "val/bleu4"),
    )

    def read_json(name: str) -> dict[str, Any]:
        path = job_dir / name
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            problems.append(f"unreadable {name}: {e}")
            return {}

    info, test = read_json("run_info.json"), read_json("test_metrics.json")
    job.test = {m: _float((test.get("metrics") or {}).get(m)) for m in METRICS} if test else {}
    job.params, job.trainable_params = info.get("params"), info.get("trainable_params")
    job.train_time_s = _float(info.get("train_time_s"))
    job.epochs = info.get("epochs") if isinstance(info.get("epochs"), int) else None
    job.best_epoch, job.best_score = info.get("best_epoch"), _float(info.get("best_score"))
    run = info.get("wandb_run") or {}
    job.wandb_run = run.get("url") or run.get("id")

    metrics_csv = job_dir / "csv" / "metrics.csv"
    if not metrics_csv.is_file():
        metrics_csv = next(iter(sorted(job_dir.glob("**/metrics.csv"))), metrics_csv)
    if metrics_csv.is_file():
        epoch, score, val = best_val_from_csv(metrics_csv, job.monitor)
        if val:
            job.best_epoch, job.best_score, job.val = epoch, score, val
        try:
            job.curve = curve_from_csv(metrics_csv)
        except (OSError, csv.Error) as e:
            problems.append(f"unreadable {metrics_csv.name}: {e}")
        if job.epochs is None and job.curve:
            job.epochs = max(e for e, _ in job.curve) + 1
    if not job.val or job.params is None:
        # No CSV logger (logger=wandb alone), or no run_info.json: the best checkpoint stores both.
        ckpt = _best_checkpoint(job_dir, test)
        if ckpt is not None:
            try:
                stored = from_checkpoint(ckpt)
            except Exception as e:
                problems.append(f"unreadable checkpoint {ckpt.name}: {e}")
            else:
                if not job.val and stored["metrics"]:
                    m = stored["metrics"]
                    job.val = {k: _float(m.get(f"val/{LOGGED[k]}")) for k in METRICS}
                    job.best_epoch = stored["epoch"] if job.best_epoch is None else job.best_epoch
                    if _float(m.get(job.monitor)) is not None:
                        job.best_score = _float(m.get(job.monitor))
                if job.params is None:
                    job.params = stored["params"]

    status = info.get("status")
    if status in ("failed", "interrupted"):
        job.status, job.note = "failed", f"{status}: {info.get('error') or 'no message'}"
    elif not test and config.get("test", True):
        job.status = "failed"
        why = {"completed": " (stopped during the test)", "running": " (killed, or still running)"}
        job.note = "no test_metrics.json" + why.get(status, "")
    if job.status == "ok":
        why = degenerate(job, job_dir)
        if why:
            job.status, job.note = "degenerate", why
    if problems:
        job.note = "; ".join([job.note, *problems] if job.note else problems)
    return job


DEGENERATE_BLEU4 = 1e-4  # below this no caption shares a 4-gram with its references


def degenerate(job: Job, job_dir: Path) -> str:
    """Why a finished job's model is useless (all test captions the same, BLEU-4 of zero), or ""."""
    preds_path = job_dir / "test_predictions.json"
    if preds_path.is_file():
        try:
            preds = json.loads(preds_path.read_text())
            captions = {p["caption"] for p in preds} if isinstance(preds, list) else set()
        except (OSError, ValueError, KeyError, TypeError):
            captions = set()
        if len(captions) == 1 and len(preds) > 1:
            return f"degenerate: all {len(preds)} test captions are {next(iter(captions))!r}"
    for split, scores in (("test", job.test), ("val", job.val)):
        b4 = scores.get("BLEU-4")
        if b4 is not None and b4 < DEGENERATE_BLEU4:
            return f"degenerate: {split} BLEU-4 {b4:.1e} (no caption shares a 4-gram with its references)"
    return ""


def _stopped(job: Job) -> bool:
    """Not finished but not broken: stopped by a signal with its checkpoint saved, or still
    running (or killed) mid-run; rerunning the sweep resumes it."""
    return job.status == "failed" and (
        job.note.startswith("interrupted")
        or "TrainingInterrupted" in job.note
        or "still running" in job.note
    )


def find_jobs(sweep_dir: Path) -> list[Path]:
    """Job directories under a multirun directory: those Hydra wrote a `.hydra/` into."""
    sweep_dir = Path(sweep_dir)
    found = sorted(p.parent.parent for p in sweep_dir.glob("**/.hydra/overrides.yaml"))
    if sweep_dir in found:  # a single run's directory: a report of one
        return [sweep_dir]
    # Skip runs nested inside a job (an evaluation written into a job's folder, say).
    return [p for p in found if not any(q in p.parents for q in found)]


@dataclass
class Sweep:
    dir: Path
    jobs: list[Job]
    swept: list[str]
    monitor: str
    optuna: dict[str, Any] | None = None

    def ranked(self) -> list[Job]:
        """Finished jobs best first, then degenerate ones, then failed ones."""
        order = {"ok": 0, "degenerate": 1}
        return sorted(
            self.jobs,
            key=lambda j: (
                order.get(j.status, 2),
                j.status == "failed" or j.best_score is None,
                0.0 if j.status == "failed" else -(j.best_score or 0.0),
                j.num,
            ),
        )


def read_sweep(sweep_dir: Path) -> Sweep:
    sweep_dir = Path(sweep_dir)
    jobs = sorted((read_job(d) for d in find_jobs(sweep_dir)), key=lambda j: j.num)
    sweeper = None
    if jobs:
        try:
            sweeper = _load_yaml(jobs[0].dir / ".hydra" / "hydra.yaml")["hydra"].get("sweeper")
        except Exception:
            sweeper = None
    declared = sweep_keys(sweep_dir, sweeper)
    # Keys whose value differs between jobs count too (a sweep launched by hand or by a plugin).
    keys = list(dict.fromkeys(k for j in jobs for k in j.overrides))
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1]
    swept = list(dict.fromkeys(declared + varying))
    if not swept and len(jobs) == 1:
        swept = keys
    monitors = [j.monitor for j in jobs]
    monitor = max(set(monitors), key=monitors.count) if monitors else "val/bleu4"
    opt = sweep_dir / "optimization_results.yaml"
    return Sweep(sweep_dir, jobs, swept, monitor, _load_yaml(opt) if opt.is_file() else None)
