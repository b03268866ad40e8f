"""Flickr8k and Flickr30k from the layouts users download, Kaggle's or the original ones."""

from __future__ import annotations

import csv
import functools
import os
import re
from collections import defaultdict
from pathlib import Path

import datasets

from ..errors import DataError
from . import SOURCES, SPLITS
from .convert import (
    KARPATHY_URL,
    Converted,
    find_karpathy,
    first_file,
    hash_order,
    list_dir,
    materialise,
    read_karpathy,
    require_some,
    resolve_root,
)

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
    root_path = resolve_root(source, root, HELP[source])
    image_dir = _find_image_dir(source, root_path)
    karpathy = find_karpathy(source, root_path, karpathy_json)
    captions_file = first_file(root_path, _CAPTION_FILES[source])
    if captions_file is None and karpathy is None:
        raise DataError(
            f"{source}: no captions file under {root_path} (looked for "
            f"{', '.join(_CAPTION_FILES[source])}) and no Karpathy dataset_{source}.json. "
            + HELP[source]
        )
    split_lists = {}
    if karpathy is None and source == "flickr8k" and captions_file is not None:
        for split, name in _SPLIT_LISTS.items():
            found = first_file(root_path, (name, f"Flickr8k_text/{name}"))
            found = found or first_file(captions_file.parent, (name,))
            if found:
                split_lists[split] = found
        if len(split_lists) != len(SPLITS):
            split_lists = {}  # a partial set of lists is no official split: use the seeded one

    def convert() -> Converted:
        present = list_dir(image_dir)
        notes: list[str] = []
        if karpathy is not None:
            by_split = {s: [] for s in SPLITS}
            for entry in read_karpathy(karpathy):
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
        require_some(source, splits, missing, image_dir, HELP[source])
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
    return materialise(source, cache_dir, args, files, convert, verify_images, num_proc)


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
    ordered = hash_order(items, seed)
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


def _read_lines(path: Path) -> list[str]:
    return [
        line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip()
    ]
