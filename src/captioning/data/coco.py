"""COCO 2014 or 2017 (images + annotations/captions_*.json); Karpathy's split when available."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import datasets

from ..errors import ConfigError, DataError
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

HELP = (
    "Get COCO from https://cocodataset.org/#download (2017 or 2014 Train and Val images, "
    "and the Train/Val annotations) and unzip them so that the root folder holds train2017/, "
    "val2017/ and annotations/captions_{train,val}2017.json (or the 2014 equivalents). "
    f"Karpathy's dataset_coco.json ({KARPATHY_URL}) in the root gives the standard split. "
    "Then pass data.args.root=/path/to/coco or set COCO_ROOT."
)


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
    root_path = resolve_root("coco", root, HELP)
    karpathy = find_karpathy("coco", root_path, karpathy_json)
    dirs = {y: _coco_dirs(root_path, y) for y in (2014, 2017) if year in (None, y)}
    dirs = {y: d for y, d in dirs.items() if d}
    if not dirs:
        want = f"{year}" if year else "2017 (or 2014)"
        raise DataError(
            f"coco: no train{want}/ and val{want}/ image folders under {root_path} (nor under "
            f"{root_path}/images). " + HELP
        )
    # With Karpathy's file (2014 names) either year works; without it 2017 is the usual download.
    chosen = 2014 if karpathy is not None and 2014 in dirs else max(dirs)
    train_dir, val_dir = dirs[chosen]
    anns = {}
    if karpathy is None:
        for split in ("train", "val"):
            ann = first_file(root_path, (f"annotations/captions_{split}{chosen}.json",))
            if ann is None:
                raise DataError(
                    f"coco: {root_path}/annotations/captions_{split}{chosen}.json is missing "
                    f"(and no Karpathy dataset_coco.json was found). " + HELP
                )
            anns[split] = ann

    def convert() -> Converted:
        present = {"train": list_dir(train_dir), "val": list_dir(val_dir)}
        folders = {"train": train_dir, "val": val_dir}
        notes: list[str] = []
        # (image id, "train"/"val" folder or None when absent, file name, captions)
        by_split: dict[str, list[tuple[str, str | None, str, list[str]]]] = {s: [] for s in SPLITS}
        if karpathy is not None:
            for e in read_karpathy(karpathy):
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
            shuffled = hash_order(by_split["val"], split_seed)
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
        require_some("coco", splits, missing, train_dir.parent, HELP)
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
    return materialise("coco", cache_dir, args, files, convert, verify_images, num_proc)


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
