"""METEOR through pycocoevalcap's Java METEOR 1.5: optional, run when Java and pycocoevalcap are there.

Every other metric is pure Python (captioning.metrics), so no run ever needs Java. The configs'
`meteor` setting is three-valued (`meteor_mode`):

- `auto` (None in code, the default): METEOR when it can run; otherwise it is reported as null
  and one log line says how to get it;
- `true`: demanded; the entry points call `require_meteor` before training or decoding starts, so
  a missing Java stops the run at once rather than after its last epoch;
- `false`: never run (validation, which scores every epoch, always skips it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import shutil
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from captioning.errors import ConfigError, UserError

__all__ = ["HOW_TO_GET", "meteor", "meteor_available", "meteor_mode", "require_meteor"]

log = logging.getLogger("captioning.meteor")

HOW_TO_GET = "install a Java runtime (java on PATH) and `pip install pycocoevalcap`"

_noted_skip = False  # one line per process, however often a run scores its test split


def meteor_available() -> bool:
    """Whether METEOR can run: a `java` on PATH and pycocoevalcap with its METEOR jar."""
    if shutil.which("java") is None:
        return False
    spec = importlib.util.find_spec("pycocoevalcap")
    locations = (spec.submodule_search_locations or []) if spec is not None else []
    return any((Path(loc) / "meteor" / "meteor-1.5.jar").is_file() for loc in locations)


def meteor_mode(value: Any, key: str = "meteor") -> bool | None:
    """A config's `meteor` value as score_corpus takes it: None (auto), True or False."""
    if value is None or value is True or value is False:
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "null", "none"):
        return None
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"{key} must be auto, true or false; got {value!r}")


def require_meteor(value: Any, key: str = "meteor") -> bool | None:
    """Check a `meteor` setting before any long work: `true` without Java is an error now."""
    mode = meteor_mode(value, key)
    if mode is True and not meteor_available():
        raise UserError(
            f"{key}=true demands METEOR, which needs Java on PATH and pycocoevalcap: "
            f"{HOW_TO_GET}, or set {key}=auto to report it as null without them"
        )
    return mode


def note_skipped() -> None:
    """Say once that METEOR was left out and how to get it (`auto` without Java/pycocoevalcap)."""
    global _noted_skip
    if not _noted_skip:
        _noted_skip = True
        log.warning(
            "METEOR skipped (reported as null): it needs Java and pycocoevalcap; %s", HOW_TO_GET
        )


def meteor(
    preds: Mapping[Hashable, str], refs: Mapping[Hashable, Sequence[str]]
) -> tuple[float, dict[Hashable, float]]:
    """METEOR of tokenized captions through pycocoevalcap (a Java subprocess, closed on exit)."""
    if not meteor_available():
        raise UserError(f"METEOR needs Java on PATH and pycocoevalcap: {HOW_TO_GET}")
    from pycocoevalcap.meteor.meteor import Meteor  # noqa: PLC0415

    # METEOR reads one line per request: a stray carriage return would desynchronise it
    res = {k: [preds[k].replace("\r", " ")] for k in preds}
    gts = {k: [r.replace("\r", " ") for r in refs[k]] for k in preds}
    scorer = Meteor()
    try:
        score, scores = scorer.compute_score(gts, res)
    finally:
        close_meteor(scorer)
    return float(score), {k: float(s) for k, s in zip(preds, scores, strict=True)}


def close_meteor(scorer: Any) -> None:
    """Stop a pycocoevalcap Meteor's JVM now (it only does so in __del__, late or never)."""
    # Its compute_score keeps its lock if it raised, and __del__ would then block forever: take
    # the lock whether or not it is free, and leave it released.
    proc = scorer.meteor_p
    scorer.lock.acquire(blocking=False)
    try:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):  # a dead JVM: flushing stdin fails
                    stream.close()
        proc.kill()
        proc.wait()
    finally:
        scorer.lock.release()
