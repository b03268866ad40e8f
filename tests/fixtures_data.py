"""Tiny datasets in the layouts users download, written into a test's tmp folder.

Each writer returns ``{file name: captions}`` so tests can compare what a source loads with what
was written. Images are small solid-colour JPEGs (colour i is a function of the image index), so
an image can also be matched to its row by its pixels.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

Captions = dict[str, list[str]]


def colour(i: int) -> tuple[int, int, int]:
    """A distinct solid colour per image index."""
    return (40 * i % 256, 255 - 30 * i % 256, 90 + 17 * i % 166)


def jpeg_bytes(rgb: tuple[int, int, int], size: tuple[int, int] = (24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_images(folder: Path, names: list[str], corrupt: tuple[int, ...] = ()) -> None:
    """Write one JPEG per name; indices in `corrupt` get a truncated or non-image file instead."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        data = jpeg_bytes(colour(i))
        if i in corrupt:
            data = data[: len(data) // 2] if i % 2 else b"<html>404 Not Found</html>"
        (folder / name).write_bytes(data)


def flickr_names(n: int, start: int = 1000) -> list[str]:
    return [f"{start + i}_{i:04x}ab.jpg" for i in range(n)]


def captions_of(name: str, per_image: int = 5, tag: str = "") -> list[str]:
    stem = Path(name).stem
    return [f"a photo {stem} with caption {k}{tag} , a comma" for k in range(per_image)]


def make_flickr8k_kaggle(root: Path, n: int = 10, corrupt: tuple[int, ...] = ()) -> Captions:
    """Kaggle layout: Images/ + captions.txt (CSV, header ``image,caption``)."""
    names = flickr_names(n)
    write_images(root / "Images", names, corrupt)
    caps = {name: captions_of(name) for name in names}
    with open(root / "captions.txt", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")  # quotes the captions holding a comma, as Kaggle
        w.writerow(["image", "caption"])
        for name, cs in caps.items():
            for c in cs:
                w.writerow([name, c])
    return caps


def make_flickr8k_original(root: Path, sizes: tuple[int, int, int] = (6, 2, 2)) -> Captions:
    """Original layout: Flicker8k_Dataset/ + Flickr8k_text/ (token file and split lists)."""
    names = flickr_names(sum(sizes))
    write_images(root / "Flicker8k_Dataset", names)
    text = root / "Flickr8k_text"
    text.mkdir(parents=True)
    caps = {name: captions_of(name) for name in names}
    lines = [f"{name}#{k}\t{c}" for name, cs in caps.items() for k, c in enumerate(cs)]
    lines.append("2258277193_586949ec62.jpg.1#0\tA stray entry whose image does not exist .")
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    lists = {"train": names[: sizes[0]], "dev": names[sizes[0] : sizes[0] + sizes[1]]}
    lists["test"] = names[sizes[0] + sizes[1] :]
    for split, members in lists.items():
        (text / f"Flickr_8k.{split}Images.txt").write_text("\n".join(members) + "\n")
    return caps


def make_flickr30k_kaggle(root: Path, n: int = 10) -> Captions:
    """Kaggle layout: flickr30k_images/results.csv + flickr30k_images/flickr30k_images/*.jpg.

    results.csv is pipe-separated with a space after each pipe, and one row lacks its second
    pipe, as in the real file ("2199200615.jpg| 4   A dog runs across the grass .").
    """
    names = [f"{1000092795 + i}.jpg" for i in range(n)]
    write_images(root / "flickr30k_images" / "flickr30k_images", names)
    caps = {name: captions_of(name) for name in names}
    lines = ["image_name| comment_number| comment"]
    for i, (name, cs) in enumerate(caps.items()):
        for k, c in enumerate(cs):
            broken = i == 1 and k == 4
            lines.append(f"{name}| {k}   {c}" if broken else f"{name}| {k}| {c}")
    (root / "flickr30k_images" / "results.csv").write_text("\n".join(lines) + "\n")
    return caps


def make_coco(root: Path, year: int = 2017, n_train: int = 6, n_val: int = 5) -> Captions:
    """Official layout: train<year>/, val<year>/, annotations/captions_{train,val}<year>.json.

    Returns captions keyed by str(image id); caption annotations are written out of id order,
    with one image holding 6 captions, to check ordering and that 5 is not assumed.
    """
    out: Captions = {}
    ann_id = 1000
    for split, n, first_id in (("train", n_train, 1), ("val", n_val, 500)):
        folder = root / f"{split}{year}"
        images, anns = [], []
        names = []
        for i in range(n):
            image_id = first_id + 7 * i
            name = (
                f"{image_id:012d}.jpg"
                if year == 2017
                else f"COCO_{split}{year}_{image_id:012d}.jpg"
            )
            names.append(name)
            images.append({"id": image_id, "file_name": name, "width": 24, "height": 16})
            caps = [f"coco {split} image {image_id} caption {k}" for k in range(6 if i == 0 else 5)]
            out[str(image_id)] = caps
            for c in caps:
                anns.append({"id": ann_id, "image_id": image_id, "caption": c + " \n"})
                ann_id += 1
        write_images(folder, names)
        (root / "annotations").mkdir(parents=True, exist_ok=True)
        doc = {
            "info": {"description": "tiny COCO"},
            "licenses": [],
            "images": images,
            "annotations": anns[::-1],
        }
        (root / "annotations" / f"captions_{split}{year}.json").write_text(json.dumps(doc))
    return out


def karpathy_entry(
    filename: str,
    split: str,
    captions: list[str],
    cocoid: int | None = None,
    filepath: str | None = None,
) -> dict:
    """One image of a Karpathy split file; tokens are a crude lower-cased split of the raw text."""
    entry = {
        "filename": filename,
        "split": split,
        "sentences": [{"raw": c, "tokens": c.lower().split()} for c in captions],
    }
    if cocoid is not None:
        entry["cocoid"] = cocoid
    if filepath is not None:
        entry["filepath"] = filepath
    return entry


def write_karpathy(path: Path, entries: list[dict], dataset: str = "flickr8k") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": entries, "dataset": dataset}))
    return path


def write_hub_folder(root: Path, splits: dict[str, int]) -> Captions:
    """A local dataset folder shaped like jxie/flickr8k: image + caption_0..caption_4 (parquet)."""
    import datasets

    out: Captions = {}
    features = datasets.Features(
        {"image": datasets.Image(), **{f"caption_{k}": datasets.Value("string") for k in range(5)}}
    )
    for split, n in splits.items():
        rows: dict[str, list] = {"image": [], **{f"caption_{k}": [] for k in range(5)}}
        for i in range(n):
            rows["image"].append({"bytes": jpeg_bytes(colour(i)), "path": f"{split}_{i}.jpg"})
            caps = [f"hub {split} image {i} caption {k}" for k in range(5)]
            out[f"{split}-{i}"] = caps
            for k, c in enumerate(caps):
                rows[f"caption_{k}"].append(c)
        ds = datasets.Dataset.from_dict(rows, features=features)
        (root / "data").mkdir(parents=True, exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return out


def write_hub_single_split(root: Path, n: int = 9) -> Captions:
    """A one-split dataset with a ``split`` column and a list-valued ``sentences`` column."""
    import datasets

    plan = ["train", "val", "test"]
    rows: dict[str, list] = {"img": [], "sentences": [], "split": [], "name": []}
    out: Captions = {}
    for i in range(n):
        caps = [f"single {i} caption {k}" for k in range(2 + i % 3)]
        rows["img"].append({"bytes": jpeg_bytes(colour(i)), "path": None})
        rows["sentences"].append(caps)
        rows["split"].append(plan[i % 3])
        rows["name"].append(f"pic{i}")
        out[f"pic{i}"] = caps
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "sentences": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "name": datasets.Value("string"),
        }
    )
    (root / "data").mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.to_parquet(str(root / "data" / "test-00000-of-00001.parquet"))
    return out
