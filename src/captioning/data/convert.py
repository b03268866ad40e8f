"""What every real source shares: finding its files, Karpathy's split file, and the conversion.

A conversion reads the annotations, assigns splits (Karpathy's when available), drops images that
are missing or do not decode, and saves the splits under ``cache_dir/<source>-<fingerprint>/``.
Local images are stored as paths, never copied. The fingerprint covers everything the result
depends on (root, arguments, annotation files' sizes and mtimes, `CONVERTER_VERSION`), so a
changed annotation file triggers a new conversion and an unchanged one is loaded straight away.
The sources themselves: `flickr`, `coco`, `hub`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..errors import DataError
from ..fsutil import atomic_dir
from . import SPLITS
from .images import check_images, warn_skipped

log = logging.getLogger(__name__)

# Bump whenever a change would alter any converted split: it is part of the cache key.
CONVERTER_VERSION = 1

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"


class SplitWarning(UserWarning):
    """The splits are not the standard ones, so scores are not comparable with the literature."""


# A row before it becomes a Dataset: (image_id, absolute image path, captions).
Row = tuple[str, str, list[str]]


@dataclass
class Converted:
    """What a source's converter returns: splits plus the notes to show whenever it is loaded."""

    splits: dict[str, datasets.Dataset | list[Row]]
    notes: list[str] = field(default_factory=list)
    missing: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) found early


def save_features() -> datasets.Features:
    """The schema a converted split is saved with (the image as a plain bytes/path struct)."""
    # The image is saved as a plain struct: `save_to_disk` would copy the bytes of every local
    # file into the cache if it were typed `Image`. Loading casts it back (`_load`).
    seq = getattr(datasets, "List", datasets.Sequence)  # `List` replaced `Sequence` in datasets 4
    return datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": {"bytes": datasets.Value("binary"), "path": datasets.Value("string")},
            "captions": seq(datasets.Value("string")),
        }
    )


# ---------------------------------------------------------------- files and splits


def resolve_root(source: str, root: str | os.PathLike | None, help_text: str) -> Path:
    """The data root as an absolute folder, or a DataError that ends with `help_text`."""
    if root is None or str(root).strip() == "":
        raise DataError(f"{source}: no data root given. " + help_text)
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{source}: data root {path} does not exist. " + help_text)
    return path


def list_dir(folder: Path) -> set[str]:
    return set(os.listdir(folder))  # one listing instead of a stat per image


def first_file(root: Path, candidates: Iterable[str]) -> Path | None:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    return None


def find_karpathy(source: str, root: Path, given: str | bool | None) -> Path | None:
    """The Karpathy split file: `given`, else dataset_<source>.json in root; False disables it."""
    if given is False or given == "":
        return None
    if given is not None and given is not True:
        for path in (Path(given).expanduser(), root / Path(given).expanduser()):
            if path.is_file():
                return path.resolve()
        raise DataError(
            f"{source}: karpathy_json {given} does not exist. Get it from {KARPATHY_URL}."
        )
    name = f"dataset_{source}.json"
    found = first_file(root, (name, f"caption_datasets/{name}", f"karpathy/{name}"))
    if found is None and given is True:
        raise DataError(f"{source}: no {name} in {root}. Get it from {KARPATHY_URL}.")
    return found


def read_karpathy(path: Path) -> list[dict[str, Any]]:
    """Entries with split (restval joins train), filename, filepath, cocoid and raw captions."""
    try:
        images = json.loads(path.read_text(encoding="utf-8"))["images"]
        out = []
        for img in images:
            split = {"restval": "train"}.get(img["split"], img["split"])
            if split not in SPLITS:
                continue
            caps = [
                " ".join(s["raw"].split()) for s in img["sentences"] if s.get("raw", "").strip()
            ]
            out.append({**img, "split": split, "captions": caps})
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is not a Karpathy split file ({type(e).__name__}: {e})") from e
    return out


def require_some(
    source: str, splits: dict[str, list[Row]], missing: list, image_dir: Path, help_text: str
) -> None:
    """A DataError (ending with `help_text`) when no split has a single image."""
    if not any(splits.values()):
        if not missing:
            raise DataError(f"{source}: the annotations name no captioned images. " + help_text)
        named = ", ".join(n for n, _ in missing[:5])
        raise DataError(
            f"{source}: none of the {len(missing)} images the annotations name are in "
            f"{image_dir} (e.g. {named}); is the root the right folder? " + help_text
        )


def hash_order(items: list[tuple], seed: int) -> list[tuple]:
    """`items` ordered by a hash of (seed, first field): a shuffle that is the same everywhere."""
    return sorted(items, key=lambda it: hashlib.sha1(f"{seed}:{it[0]}".encode()).hexdigest())


# ---------------------------------------------------------------- conversion and cache


def _cache_path(cache_dir: str, source: str, args: dict, files: list[Path]) -> Path:
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    key = json.dumps(
        {"source": source, "version": CONVERTER_VERSION, "args": args, "files": stats},
        sort_keys=True,
        default=str,
    )
    fingerprint = hashlib.sha1(key.encode()).hexdigest()[:16]
    return Path(cache_dir).expanduser() / f"{source}-{fingerprint}"


def materialise(
    source: str,
    cache_dir: str,
    args: dict,
    files: list[Path],
    convert: Callable[[], Converted],
    verify_images: bool,
    num_proc: int | None,
) -> dict[str, datasets.Dataset]:
    """Load the converted splits from the cache, converting them first if needed."""
    path = _cache_path(cache_dir, source, args, files)
    if path.exists():  # complete by construction: written elsewhere, then renamed
        log.info("loading %s from %s", source, path)
    else:
        _convert_to(path, source, convert, args["limits"], verify_images, num_proc)
    return _load(path)


def _convert_to(
    path: Path,
    source: str,
    convert: Callable[[], Converted],
    limits: list[int | None],
    verify_images: bool,
    num_proc: int | None,
) -> None:
    start = time.perf_counter()
    log.info("converting %s into %s (first use only)", source, path)
    converted = convert()
    features = save_features()
    dd, failures, total = {}, list(converted.missing), len(converted.missing)
    for split, limit in zip(SPLITS, limits, strict=True):
        ds = converted.splits[split]
        if isinstance(ds, list):
            ds = datasets.Dataset.from_dict(
                {
                    "image_id": [r[0] for r in ds],
                    "image": [{"bytes": None, "path": r[1]} for r in ds],
                    "captions": [r[2] for r in ds],
                },
                features=features,
            )
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        total += len(ds)
        if verify_images and len(ds):
            good, bad = check_images(ds, num_proc=_num_proc(num_proc, len(ds)))
            failures += bad
            if bad:
                ds = ds.select(good)
        dd[split] = ds
    warn_skipped(failures, total, f"{source} images")
    # A reader sees all of it or nothing; of two processes converting at once, one copy stays.
    with atomic_dir(path) as tmp:
        # An empty split needs one (empty) shard: with zero, `load_from_disk` fails on it.
        empty = {s: 1 for s, d in dd.items() if len(d) == 0}
        datasets.DatasetDict(dd).save_to_disk(str(tmp), num_shards=empty)
        meta = {
            "source": source,
            "converter_version": CONVERTER_VERSION,
            "images": {s: len(d) for s, d in dd.items()},
            "captions": {s: sum(map(len, d["captions"])) for s, d in dd.items()},
            "skipped": len(failures),
            "skipped_first": failures[:50],
            "notes": converted.notes,
            "seconds": round(time.perf_counter() - start, 2),
        }
        (tmp / "conversion.json").write_text(json.dumps(meta, indent=2))
    log.info("converted %s (%s images) in %.1f s", source, meta["images"], meta["seconds"])


def _num_proc(num_proc: int | None, n: int) -> int | None:
    if num_proc is not None:
        return num_proc
    return min(4, os.cpu_count() or 1) if n >= 4000 else None  # processes pay off only at scale


def _load(path: Path) -> dict[str, datasets.Dataset]:
    dd = datasets.load_from_disk(str(path))
    meta = json.loads((path / "conversion.json").read_text())
    for note in meta.get("notes", []):
        warnings.warn(note, SplitWarning, stacklevel=4)
    if meta.get("skipped"):  # warned about at conversion; a reminder in the log is enough now
        log.info("%d unreadable images were left out (see %s)", meta["skipped"], path)
    image = datasets.Image(decode=False)
    return {s: dd[s].cast_column("image", image) for s in SPLITS}


def conversion_info(split: datasets.Dataset) -> dict[str, Any] | None:
    """The conversion.json saved next to a converted split (counts, skipped images, notes)."""
    for f in split.cache_files:
        meta = Path(f["filename"]).parent.parent / "conversion.json"
        if meta.is_file():
            return json.loads(meta.read_text())
    return None
