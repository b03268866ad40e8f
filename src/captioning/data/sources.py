"""Real dataset sources: Flickr8k, Flickr30k and COCO from the layouts users download, and any
Hugging Face Hub dataset, each converted once into the row schema of `captioning.data`.

A conversion reads the annotations, assigns splits (Karpathy's when available), drops images that
are missing or do not decode, and saves the splits under ``cache_dir/<source>-<fingerprint>/``.
Local images are stored as paths, never copied. The fingerprint covers everything the result
depends on (root, arguments, annotation files' sizes and mtimes, `CONVERTER_VERSION`), so a
changed annotation file triggers a new conversion and an unchanged one is loaded straight away.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from ..errors import ConfigError, DataError
from . import SOURCES, SPLITS
from .images import check_images, warn_skipped

log = logging.getLogger(__name__)

# Bump whenever a change would alter any converted split: it is part of the cache key.
CONVERTER_VERSION = 1

KARPATHY_URL = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
HELP = {
    "flickr8k": (
        "Get Flickr8k from https://www.kaggle.com/datasets/adityajn105/flickr8k and unzip it so "
        "that the root folder holds Images/ and captions.txt (the original layout, "
        "Flicker8k_Dataset/ + Flickr8k.token.txt + Flickr_8k.*Images.txt, works too). "
        f"Karpathy's dataset_flickr8k.json ({KARPATHY_URL}) in the root gives the standard split. "
        "Then pass data.args.root=/path/to/flickr8k or set FLICKR8K_ROOT."
    ),
    "flickr30k": (
        "Get Flickr30k from https://www.kaggle.com/datasets/hsankesara/flickr-image-dataset and "
        "unzip it so that the root folder holds flickr30k_images/results.csv and the images in "
        "flickr30k_images/flickr30k_images/ (Images/ + captions.txt works too). "
        f"Karpathy's dataset_flickr30k.json ({KARPATHY_URL}) in the root gives the standard "
        "split. Then pass data.args.root=/path/to/flickr30k or set FLICKR30K_ROOT."
    ),
    "coco": (
        "Get COCO from https://cocodataset.org/#download (2017 or 2014 Train and Val images, "
        "and the Train/Val annotations) and unzip them so that the root folder holds train2017/, "
        "val2017/ and annotations/captions_{train,val}2017.json (or the 2014 equivalents). "
        f"Karpathy's dataset_coco.json ({KARPATHY_URL}) in the root gives the standard split. "
        "Then pass data.args.root=/path/to/coco or set COCO_ROOT."
    ),
}
# Karpathy's (train, val, test) sizes, used for a seeded split when no split file exists.
KARPATHY_SIZES = {"flickr8k": (6000, 1000, 1000), "flickr30k": (29000, 1014, 1000)}

_IMAGE_DIRS = {
    "flickr8k": ("Images", "images", "Flicker8k_Dataset", "Flickr8k_Dataset"),
    "flickr30k": (
        "flickr30k_images/flickr30k_images",
        "flickr30k_images",
        "flickr30k-images",
        "Images",
        "images",
    ),
}
_CAPTION_FILES = {
    "flickr8k": ("captions.txt", "Flickr8k.token.txt", "Flickr8k_text/Flickr8k.token.txt"),
    "flickr30k": (
        "flickr30k_images/results.csv",
        "results.csv",
        "flickr30k_images/flickr30k_images/results.csv",
        "captions.txt",
        "results_20130124.token",
        "flickr30k/results_20130124.token",
    ),
}
_SPLIT_LISTS = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt"}
_SPLIT_LISTS["test"] = "Flickr_8k.testImages.txt"
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


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


def _save_features() -> datasets.Features:
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


# ---------------------------------------------------------------- Flickr8k / Flickr30k


def _build_flickr(
    source: str,
    cache_dir: str,
    root: str | None = None,
    karpathy_json: str | bool | None = None,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    verify_images: bool = True,
    num_proc: int | None = None,
) -> dict[str, datasets.Dataset]:
    """Flickr8k/30k splits: Karpathy's when found, else official lists, else a seeded split."""
    root_path = _resolve_root(source, root)
    image_dir = _find_image_dir(source, root_path)
    karpathy = _find_karpathy(source, root_path, karpathy_json)
    captions_file = _first_file(root_path, _CAPTION_FILES[source])
    if captions_file is None and karpathy is None:
        raise DataError(
            f"{source}: no captions file under {root_path} (looked for "
            f"{', '.join(_CAPTION_FILES[source])}) and no Karpathy dataset_{source}.json. "
            + HELP[source]
        )
    split_lists = {}
    if karpathy is None and source == "flickr8k" and captions_file is not None:
        for split, name in _SPLIT_LISTS.items():
            found = _first_file(root_path, (name, f"Flickr8k_text/{name}"))
            found = found or _first_file(captions_file.parent, (name,))
            if found:
                split_lists[split] = found
        if len(split_lists) != len(SPLITS):
            split_lists = {}  # a partial set of lists is no official split: use the seeded one

    def convert() -> Converted:
        present = _list_dir(image_dir)
        notes: list[str] = []
        if karpathy is not None:
            by_split = {s: [] for s in SPLITS}
            for entry in _read_karpathy(karpathy):
                by_split[entry["split"]].append((entry["filename"], entry["captions"]))
        else:
            captions = _read_flickr_captions(captions_file)
            if split_lists:
                by_split = {
                    s: [(n, captions[n]) for n in _read_lines(p) if n in captions]
                    for s, p in split_lists.items()
                }
            else:
                by_split = _seeded_split(
                    sorted(captions.items()), KARPATHY_SIZES[source], split_seed
                )
                sizes = "/".join(str(len(by_split[s])) for s in SPLITS)
                notes.append(
                    f"{source}: no split file found (Karpathy's dataset_{source}.json or official "
                    f"split lists), so the images were split at random with seed {split_seed} "
                    f"into {sizes} train/val/test images; scores are not comparable with "
                    f"published results. Put dataset_{source}.json ({KARPATHY_URL}) in the root."
                )
        splits, missing = {}, []
        for split, items in by_split.items():
            rows = []
            for filename, caps in items:
                if filename not in present:
                    missing.append((filename, "file not found"))
                elif caps:
                    rows.append((Path(filename).stem, str(image_dir / filename), caps))
            splits[split] = rows
        _require_some(source, splits, missing, image_dir)
        return Converted(splits, notes, missing)

    files = [f for f in (captions_file, karpathy, *split_lists.values()) if f is not None]
    args = dict(
        root=str(root_path),
        image_dir=str(image_dir),
        karpathy_json=str(karpathy) if karpathy else None,
        split_seed=split_seed,
        limits=[limit_train, limit_val, limit_test],
        verify_images=verify_images,
    )
    return _materialise(source, cache_dir, args, files, convert, verify_images, num_proc)


# Flickr8k: the Kaggle or the original layout; Flickr30k: Kaggle's results.csv or captions.txt.
build_flickr8k = SOURCES.register("flickr8k")(functools.partial(_build_flickr, "flickr8k"))
build_flickr30k = SOURCES.register("flickr30k")(functools.partial(_build_flickr, "flickr30k"))


def _read_flickr_captions(path: Path) -> dict[str, list[str]]:
    """File name -> captions, from captions.txt, a ``*.token`` file or Flickr30k's results.csv."""
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    head = lines[0].lower() if lines else ""
    out: dict[str, list[str]] = defaultdict(list)

    def add(name: str, caption: str) -> None:
        caption = " ".join(caption.split())
        if name.strip() and caption:
            out[name.strip()].append(caption)

    if "|" in head and "comment" in head:
        # Flickr30k Kaggle: "1000092795.jpg| 0| Two young guys ...", with one known broken row,
        # "2199200615.jpg| 4   A dog runs across the grass .", that lacks the second "|".
        for line in lines[1:]:
            name, sep, rest = line.partition("|")
            _, sep2, caption = rest.partition("|")
            if sep and not sep2:
                match = re.match(r"\s*\d+\s+(.*)", rest)
                caption = match.group(1) if match else ""
            if sep:
                add(name, caption)
    elif head.replace(" ", "").startswith("image,caption"):
        # Kaggle captions.txt: standard CSV, captions holding a comma are quoted.
        for row in csv.reader(lines[1:]):
            if len(row) >= 2:
                add(row[0], ",".join(row[1:]))
    elif "\t" in head:
        # Original token files: "1000268201_693b08cb0e.jpg#0<TAB>A child in a pink dress ..."
        for line in lines:
            key, sep, caption = line.partition("\t")
            if sep:
                add(key.strip().rsplit("#", 1)[0], caption)
    else:
        raise DataError(
            f"{path}: unrecognised captions format (first line {head[:60]!r}). "
            "Expected a Kaggle captions.txt ('image,caption' header), a Flickr8k.token.txt "
            "('name.jpg#0<TAB>caption') or a Flickr30k results.csv ('image_name| comment_number| "
            "comment' header)."
        )
    return dict(out)


def _seeded_split(
    items: list[tuple[str, list[str]]], sizes: tuple[int, int, int], seed: int
) -> dict[str, list[tuple[str, list[str]]]]:
    """Split by image into Karpathy-sized train/val (test gets the rest), scaled down if small.

    Images are ordered by a hash of (seed, name), so each image's place does not depend on which
    other images exist, and the split is the same on every machine and Python version.
    """
    ordered = _hash_order(items, seed)
    n = len(ordered)
    scale = min(1.0, n / sum(sizes))
    n_train, n_val = round(sizes[0] * scale), round(sizes[1] * scale)
    if n >= 3:  # keep every split non-empty on tiny datasets
        n_val = max(n_val, 1)
        n_train = min(max(n_train, 1), n - n_val - 1)
    picked = {
        "train": ordered[:n_train],
        "val": ordered[n_train : n_train + n_val],
        "test": ordered[n_train + n_val :],
    }
    return {s: sorted(v) for s, v in picked.items()}


def _hash_order(items: list[tuple], seed: int) -> list[tuple]:
    """`items` ordered by a hash of (seed, first field): a shuffle that is the same everywhere."""
    return sorted(items, key=lambda it: hashlib.sha1(f"{seed}:{it[0]}".encode()).hexdigest())


# ---------------------------------------------------------------- COCO


@SOURCES.register("coco")
def build_coco(
    cache_dir: str,
    root: str | None = None,
    karpathy_json: str | bool | None = None,
    year: int | None = None,
    split_seed: int = 0,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    verify_images: bool = True,
    num_proc: int | None = None,
) -> dict[str, datasets.Dataset]:
    """COCO 2014/2017 (images + annotations/captions_*.json); Karpathy's split when available."""
    if year not in (None, 2014, 2017):
        raise ConfigError(f"coco year must be 2014, 2017 or null, got {year!r}")
    root_path = _resolve_root("coco", root)
    karpathy = _find_karpathy("coco", root_path, karpathy_json)
    dirs = {y: _coco_dirs(root_path, y) for y in (2014, 2017) if year in (None, y)}
    dirs = {y: d for y, d in dirs.items() if d}
    if not dirs:
        want = f"{year}" if year else "2017 (or 2014)"
        raise DataError(
            f"coco: no train{want}/ and val{want}/ image folders under {root_path} (nor under "
            f"{root_path}/images). " + HELP["coco"]
        )
    # With Karpathy's file (2014 names) either year works; without it 2017 is the usual download.
    chosen = 2014 if karpathy is not None and 2014 in dirs else max(dirs)
    train_dir, val_dir = dirs[chosen]
    anns = {}
    if karpathy is None:
        for split in ("train", "val"):
            ann = _first_file(root_path, (f"annotations/captions_{split}{chosen}.json",))
            if ann is None:
                raise DataError(
                    f"coco: {root_path}/annotations/captions_{split}{chosen}.json is missing "
                    f"(and no Karpathy dataset_coco.json was found). " + HELP["coco"]
                )
            anns[split] = ann

    def convert() -> Converted:
        present = {"train": _list_dir(train_dir), "val": _list_dir(val_dir)}
        folders = {"train": train_dir, "val": val_dir}
        notes: list[str] = []
        # (image id, "train"/"val" folder or None when absent, file name, captions)
        by_split: dict[str, list[tuple[str, str | None, str, list[str]]]] = {s: [] for s in SPLITS}
        if karpathy is not None:
            for e in _read_karpathy(karpathy):
                # 2017 names a file by its COCO id alone: "COCO_val2014_000000391895.jpg" is
                # "000000391895.jpg" there.
                cocoid = int(e.get("cocoid") or re.findall(r"\d+", e["filename"])[-1])
                name = e["filename"] if chosen == 2014 else f"{cocoid:012d}.jpg"
                folder = _coco_folder(e.get("filepath"), name, present)
                by_split[e["split"]].append((str(cocoid), folder, name, e["captions"]))
        else:
            for split, ann in anns.items():
                for image_id, name, caps in _read_coco_captions(ann):
                    by_split[split].append((image_id, split, name, caps))
            shuffled = _hash_order(by_split["val"], split_seed)
            half = (len(shuffled) + 1) // 2
            by_split["val"], by_split["test"] = sorted(shuffled[:half]), sorted(shuffled[half:])
            notes.append(
                f"coco: no Karpathy dataset_coco.json found, so train{chosen} is the training "
                f"split and val{chosen} was split in half at random into val/test "
                f"({len(by_split['val'])}/{len(by_split['test'])} images); scores are not "
                f"comparable with published results. Put dataset_coco.json ({KARPATHY_URL}) in "
                "the root for the standard split."
            )
        splits, missing = {}, []
        for split, items in by_split.items():
            rows = []
            for image_id, folder, name, caps in items:
                if folder is None or name not in present[folder]:
                    missing.append((name, "file not found"))
                elif caps:
                    rows.append((image_id, str(folders[folder] / name), caps))
            splits[split] = rows
        _require_some("coco", splits, missing, train_dir.parent)
        return Converted(splits, notes, missing)

    files = [karpathy] if karpathy is not None else list(anns.values())
    args = dict(
        root=str(root_path),
        image_dirs=[str(train_dir), str(val_dir)],
        karpathy_json=str(karpathy) if karpathy else None,
        split_seed=split_seed,
        limits=[limit_train, limit_val, limit_test],
        verify_images=verify_images,
    )
    return _materialise("coco", cache_dir, args, files, convert, verify_images, num_proc)


def _coco_dirs(root: Path, year: int) -> tuple[Path, Path] | None:
    for base in (root, root / "images"):
        train, val = base / f"train{year}", base / f"val{year}"
        if train.is_dir() and val.is_dir():
            return train, val
    return None


def _coco_folder(filepath: str | None, name: str, present: dict[str, set[str]]) -> str | None:
    """Which of our train/val folders holds `name` (Karpathy's filepath is a hint, not a rule)."""
    hint = "val" if filepath and filepath.startswith("val") else "train"
    for folder in (hint, "val" if hint == "train" else "train"):
        if name in present[folder]:
            return folder
    return None


def _read_coco_captions(path: Path) -> list[tuple[str, str, list[str]]]:
    """(image id, file name, captions in annotation-id order) for every image of a captions json."""
    from pycocotools.coco import COCO  # imported here: only this source needs it

    with contextlib.redirect_stdout(io.StringIO()):  # COCO() prints progress lines
        try:
            coco = COCO(str(path))
        except (ValueError, KeyError, AssertionError) as e:
            raise DataError(f"{path} is not a COCO captions file ({e})") from e
    out = []
    for image_id in sorted(coco.imgs):
        anns = sorted(coco.imgToAnns.get(image_id, []), key=lambda a: a["id"])
        caps = [" ".join(a["caption"].split()) for a in anns if a.get("caption", "").strip()]
        out.append((str(image_id), coco.imgs[image_id]["file_name"], caps))
    return out


# ---------------------------------------------------------------- Hugging Face Hub


@SOURCES.register("hub")
def build_hub(
    cache_dir: str,
    hub_id: str | None = None,
    config_name: str | None = None,
    revision: str | None = None,
    image_column: str = "image",
    caption_columns: list[str] | str | None = None,
    id_column: str | None = None,
    splits: dict[str, str] | None = None,
    split_column: str | None = None,
    limit_train: int | None = None,
    limit_val: int | None = None,
    limit_test: int | None = None,
    verify_images: bool = True,
    num_proc: int | None = None,
    hub_cache_dir: str | None = None,
) -> dict[str, datasets.Dataset]:
    """A Hub dataset (or a local dataset folder), its columns mapped onto our schema.

    `caption_columns`: one list-valued column or several string columns; None picks
    ``captions``/``caption``/``sentences`` or ``caption_0..caption_N``. `splits` maps our split
    names to the dataset's (default: train/validation/test, with val/valid/dev tried too); with
    `split_column` they are values of that column instead. The first conversion is cached, so
    later runs need no network; pin `revision` to notice upstream changes.
    """
    if not hub_id:
        raise ConfigError("data source 'hub' needs hub_id, e.g. data.args.hub_id=jxie/flickr8k")
    mapping = dict(splits or {"train": "train", "val": "validation", "test": "test"})

    def convert() -> Converted:
        try:
            raw = datasets.load_dataset(
                hub_id, config_name, revision=revision, cache_dir=hub_cache_dir
            )
        except Exception as e:
            raise _hub_error(hub_id, e) from e
        if split_column is not None:
            allset = datasets.concatenate_datasets(list(raw.values()))
            _require_columns(hub_id, allset, [split_column])
            values = allset[split_column]
            parts = {
                ours: allset.select([i for i, v in enumerate(values) if v == theirs])
                for ours, theirs in mapping.items()
            }
        else:
            parts = {ours: raw[_hub_split(hub_id, raw, theirs)] for ours, theirs in mapping.items()}
        out = {}
        dropped = 0
        for split, ds in parts.items():
            ds, n_empty = _normalise_hub(
                hub_id, split, ds, image_column, caption_columns, id_column
            )
            out[split], dropped = ds, dropped + n_empty
        if dropped:
            log.warning("%s: dropped %d rows without any caption", hub_id, dropped)
        return Converted(out)

    args = dict(
        hub_id=hub_id,
        config_name=config_name,
        revision=revision,
        image_column=image_column,
        caption_columns=caption_columns,
        id_column=id_column,
        splits=mapping,
        split_column=split_column,
        limits=[limit_train, limit_val, limit_test],
        verify_images=verify_images,
    )
    local = Path(hub_id).expanduser()
    if local.exists():  # a local dataset folder: its files belong in the fingerprint
        args["hub_id"] = str(local.resolve())
        files = sorted(p for p in local.rglob("*") if p.is_file())
    else:
        files = []
    return _materialise("hub", cache_dir, args, files, convert, verify_images, num_proc)


def _hub_error(hub_id: str, e: Exception) -> DataError:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    names = {type(c).__name__ for c in chain}
    local = "Local files work without it: e.g. data=flickr8k data.args.root=/path/to/flickr8k."
    if "DatasetNotFoundError" in names or "RepositoryNotFoundError" in names:
        return DataError(
            f"Hugging Face dataset {hub_id!r} was not found on the Hub (check the id; private or "
            f"gated datasets need `hf auth login`). {local}"
        )
    if any(isinstance(c, ConnectionError | TimeoutError) for c in chain) or any(
        "Offline" in n or "Connect" in n or "Timeout" in n for n in names
    ):
        offline = any("Offline" in f"{type(c).__name__} {c}" for c in chain)
        why = " (offline mode is on: HF_HUB_OFFLINE is set)" if offline else ""
        return DataError(
            f"could not load the Hugging Face dataset {hub_id!r}: the Hub could not be reached"
            f"{why} and no cached copy exists. {local}"
        )
    return DataError(f"could not load the Hugging Face dataset {hub_id!r}: {e}. {local}")


def _hub_split(hub_id: str, raw: datasets.DatasetDict, name: str) -> str:
    aliases = {"validation": ("validation", "val", "valid", "dev"), "val": ("val", "validation")}
    for candidate in aliases.get(name, (name,)):
        if candidate in raw:
            return candidate
    raise ConfigError(
        f"{hub_id} has no split {name!r}; it has {', '.join(raw)}. Map ours with "
        "data.args.splits={train: ..., val: ..., test: ...} or use data.args.split_column."
    )


def _require_columns(hub_id: str, ds: datasets.Dataset, cols: Iterable[str]) -> None:
    missing = [c for c in cols if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"{hub_id} has no column {', '.join(map(repr, missing))}; its columns are "
            f"{', '.join(ds.column_names)} (set data.args.image_column / caption_columns)"
        )


def _normalise_hub(
    hub_id: str,
    split: str,
    ds: datasets.Dataset,
    image_column: str,
    caption_columns: list[str] | str | None,
    id_column: str | None,
) -> tuple[datasets.Dataset, int]:
    """Map a Hub split onto our schema; returns it and the number of rows with no caption."""
    cols = _caption_columns(hub_id, ds, caption_columns)
    _require_columns(hub_id, ds, [image_column, *cols, *([id_column] if id_column else [])])
    table = ds.select_columns(cols).to_dict()
    captions = [_flatten_captions(vals) for vals in zip(*(table[c] for c in cols), strict=True)]
    if id_column:
        ids = [str(v) for v in ds.select_columns([id_column]).to_dict()[id_column]]
    else:
        ids = [f"{split}-{i:07d}" for i in range(len(ds))]
    # Table-level casts only (no map): the image bytes are not rewritten here.
    images = ds.select_columns([image_column]).cast_column(
        image_column, datasets.Image(decode=False)
    )
    images = images.cast_column(image_column, _save_features()["image"])
    if image_column != "image":
        images = images.rename_column(image_column, "image")
    out = images.add_column("captions", captions).add_column("image_id", ids)
    keep = [i for i, caps in enumerate(captions) if caps]
    if len(keep) < len(out):
        out = out.select(keep)
    return out.select_columns(["image_id", "image", "captions"]), len(captions) - len(keep)


def _caption_columns(hub_id: str, ds: datasets.Dataset, given: list[str] | str | None) -> list[str]:
    if isinstance(given, str):
        return [given]
    if given:
        return list(given)
    for name in ("captions", "caption", "sentences", "text"):
        if name in ds.column_names:
            return [name]
    numbered = [c for c in ds.column_names if re.fullmatch(r"captions?_?\d+", c)]
    if numbered:
        return sorted(numbered, key=lambda c: int(re.sub(r"\D", "", c)))
    raise ConfigError(
        f"{hub_id}: cannot tell which columns hold captions; its columns are "
        f"{', '.join(ds.column_names)} (set data.args.caption_columns)"
    )


def _flatten_captions(values: Iterable[Any]) -> list[str]:
    """Strings, lists of strings, or Karpathy-style {"raw": ...} dicts -> a list of captions."""
    out: list[str] = []
    for v in values:
        if isinstance(v, dict):
            v = v.get("raw") or v.get("caption") or v.get("text")
        if isinstance(v, list | tuple):
            out.extend(_flatten_captions(v))
        elif isinstance(v, str) and v.strip():
            out.append(" ".join(v.split()))
    return out


# ---------------------------------------------------------------- shared: files and splits


def _resolve_root(source: str, root: str | os.PathLike | None) -> Path:
    if root is None or str(root).strip() == "":
        raise DataError(f"{source}: no data root given. " + HELP[source])
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        raise DataError(f"{source}: data root {path} does not exist. " + HELP[source])
    return path


def _find_image_dir(source: str, root: Path) -> Path:
    for rel in _IMAGE_DIRS[source]:
        d = root / rel
        if d.is_dir() and _has_image(d):
            return d
    raise DataError(
        f"{source}: no image folder under {root} (looked for "
        f"{', '.join(r + '/' for r in _IMAGE_DIRS[source])} holding .jpg files). " + HELP[source]
    )


def _has_image(folder: Path) -> bool:
    with os.scandir(folder) as it:
        return any(e.name.lower().endswith(_IMAGE_SUFFIXES) for e in it)


def _list_dir(folder: Path) -> set[str]:
    return set(os.listdir(folder))  # one listing instead of a stat per image


def _first_file(root: Path, candidates: Iterable[str]) -> Path | None:
    for rel in candidates:
        if (root / rel).is_file():
            return root / rel
    return None


def _read_lines(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()
    ]


def _find_karpathy(source: str, root: Path, given: str | bool | None) -> Path | None:
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
    found = _first_file(root, (name, f"caption_datasets/{name}", f"karpathy/{name}"))
    if found is None and given is True:
        raise DataError(f"{source}: no {name} in {root}. Get it from {KARPATHY_URL}.")
    return found


def _read_karpathy(path: Path) -> list[dict[str, Any]]:
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


def _require_some(
    source: str, splits: dict[str, list[Row]], missing: list, image_dir: Path
) -> None:
    if not any(splits.values()):
        if not missing:
            raise DataError(f"{source}: the annotations name no captioned images. " + HELP[source])
        named = ", ".join(n for n, _ in missing[:5])
        raise DataError(
            f"{source}: none of the {len(missing)} images the annotations name are in "
            f"{image_dir} (e.g. {named}); is the root the right folder? " + HELP[source]
        )


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


def _materialise(
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
    features = _save_features()
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
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written into a sibling temporary folder, then renamed: a reader sees all of it or nothing,
    # and of two processes converting at once, the second to finish just drops its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
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
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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
