"""Real-data sources: each layout on tiny fixtures (fast), the staged datasets (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import datasets
import pytest

from captioning.data import SOURCES, SPLITS, convert, flickr, load_splits
from captioning.data.images import SkippedImagesWarning
from captioning.errors import ConfigError, DataError
from fixtures_data import (
    captions_of,
    flickr_names,
    karpathy_entry,
    make_coco,
    make_flickr8k_kaggle,
    make_flickr8k_original,
    make_flickr30k_kaggle,
    write_hub_folder,
    write_hub_single_split,
    write_karpathy,
)

STAGED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def load(source: str, tmp_path: Path, **args) -> tuple[dict, list[warnings.WarningMessage]]:
    """Load a source with cache_dir in tmp_path, returning the splits and the warnings raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        splits = load_splits(source, cache_dir=str(tmp_path / "cache"), **args)
    return splits, list(caught)


def of(caught: list[warnings.WarningMessage], category: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


def by_id(ds: datasets.Dataset) -> dict[str, list[str]]:
    return dict(zip(ds["image_id"], ds["captions"], strict=True))


def check_schema(splits: dict) -> None:
    assert set(splits) == set(SPLITS)
    for ds in splits.values():
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["image"].decode is False
        assert ds.features["image_id"] == datasets.Value("string")
        for row in ds:
            assert row["image"]["bytes"] is None  # local files are referenced, never copied
            assert Path(row["image"]["path"]).is_absolute()
            assert Path(row["image"]["path"]).is_file()
            assert row["captions"] and all(isinstance(c, str) for c in row["captions"])
        assert len(set(ds["image_id"])) == len(ds)


def test_sources_registered() -> None:
    # Each source module registers itself on import; `load_splits` imports them lazily.
    from captioning.data import coco, hub  # noqa: F401

    assert {"flickr8k", "flickr30k", "coco", "hub"} <= set(SOURCES.names())


# ---------------------------------------------------------------- Flickr8k


def test_flickr8k_kaggle_seeded_split(tmp_path: Path) -> None:
    written = make_flickr8k_kaggle(tmp_path / "f8k", n=10)
    splits, caught = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    check_schema(splits)
    # Karpathy's 6000/1000/rest scaled to 10 images.
    assert [len(splits[s]) for s in SPLITS] == [8, 1, 1]
    loaded = {}
    for ds in splits.values():
        loaded.update(by_id(ds))
    assert loaded == {Path(n).stem: c for n, c in written.items()}  # commas survive the CSV
    (note,) = of(caught, convert.SplitWarning)
    assert "not comparable" in note and "dataset_flickr8k.json" in note
    assert not of(caught, SkippedImagesWarning)
    # Deterministic: a fresh conversion elsewhere gives the same split.
    again, _ = load("flickr8k", tmp_path / "other", root=str(tmp_path / "f8k"))
    assert all(list(again[s]["image_id"]) == list(splits[s]["image_id"]) for s in SPLITS)


def test_flickr8k_karpathy_wins_and_raw_sentences_used(tmp_path: Path) -> None:
    root = tmp_path / "f8k"
    make_flickr8k_kaggle(root, n=10)
    names = flickr_names(10)
    plan = ["train"] * 5 + ["val"] * 2 + ["test"] * 2  # the 10th image is in no split
    entries = [
        karpathy_entry(n, s, captions_of(n, 3, tag=" (raw)"))
        for n, s in zip(names, plan, strict=False)
    ]
    write_karpathy(root / "dataset_flickr8k.json", entries)
    splits, caught = load("flickr8k", tmp_path, root=str(root))
    check_schema(splits)
    assert [len(splits[s]) for s in SPLITS] == [5, 2, 2]
    assert list(splits["val"]["image_id"]) == [Path(n).stem for n in names[5:7]]
    assert splits["train"][0]["captions"] == captions_of(names[0], 3, tag=" (raw)")
    assert not of(caught, convert.SplitWarning)

    # karpathy_json=False falls back to the seeded split, even with the file in root.
    splits, caught = load("flickr8k", tmp_path, root=str(root), karpathy_json=False)
    assert [len(splits[s]) for s in SPLITS] == [8, 1, 1]
    assert of(caught, convert.SplitWarning)


def test_flickr8k_explicit_karpathy_path(tmp_path: Path) -> None:
    root = tmp_path / "f8k"
    make_flickr8k_kaggle(root, n=6)
    names = flickr_names(6)
    entries = [karpathy_entry(n, "test", ["x"]) for n in names]
    path = write_karpathy(tmp_path / "elsewhere" / "my_split.json", entries)
    splits, _ = load("flickr8k", tmp_path, root=str(root), karpathy_json=str(path))
    assert [len(splits[s]) for s in SPLITS] == [0, 0, 6]
    with pytest.raises(DataError, match="does not exist"):
        load("flickr8k", tmp_path, root=str(root), karpathy_json=str(tmp_path / "nope.json"))


def test_flickr8k_original_layout_uses_official_lists(tmp_path: Path) -> None:
    written = make_flickr8k_original(tmp_path / "f8k", sizes=(6, 2, 2))
    splits, caught = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    check_schema(splits)
    names = list(written)
    assert list(splits["train"]["image_id"]) == sorted(Path(n).stem for n in names[:6])
    assert list(splits["val"]["image_id"]) == sorted(Path(n).stem for n in names[6:8])
    assert list(splits["test"]["image_id"]) == sorted(Path(n).stem for n in names[8:])
    assert by_id(splits["train"])[Path(names[0]).stem] == written[names[0]]
    assert not of(caught, convert.SplitWarning)  # official lists: nothing to warn about
    assert not of(caught, SkippedImagesWarning)  # the stray ".jpg.1" entry is in no list


# ---------------------------------------------------------------- Flickr30k


def test_flickr30k_results_csv(tmp_path: Path) -> None:
    written = make_flickr30k_kaggle(tmp_path / "f30k", n=10)
    splits, caught = load("flickr30k", tmp_path, root=str(tmp_path / "f30k"))
    check_schema(splits)
    assert sum(len(ds) for ds in splits.values()) == 10
    assert all(len(splits[s]) >= 1 for s in SPLITS)
    loaded = {}
    for ds in splits.values():
        loaded.update(by_id(ds))
    # Stray spaces stripped, and the row missing its second "|" still parsed.
    assert loaded == {Path(n).stem: c for n, c in written.items()}
    assert of(caught, convert.SplitWarning)


def test_flickr30k_karpathy(tmp_path: Path) -> None:
    root = tmp_path / "f30k"
    written = make_flickr30k_kaggle(root, n=6)
    names = list(written)
    entries = [
        karpathy_entry(n, s, ["k"])
        for n, s in zip(names, ["train"] * 4 + ["val", "test"], strict=True)
    ]
    write_karpathy(root / "dataset_flickr30k.json", entries, "flickr30k")
    splits, caught = load("flickr30k", tmp_path, root=str(root))
    assert [len(splits[s]) for s in SPLITS] == [4, 1, 1]
    assert not of(caught, convert.SplitWarning)


# ---------------------------------------------------------------- COCO


def test_coco_2017_without_karpathy(tmp_path: Path) -> None:
    written = make_coco(tmp_path / "coco", 2017, n_train=6, n_val=5)
    splits, caught = load("coco", tmp_path, root=str(tmp_path / "coco"))
    check_schema(splits)
    assert [len(splits[s]) for s in SPLITS] == [6, 3, 2]  # val2017 halved into val/test
    assert set(splits["val"]["image_id"]).isdisjoint(splits["test"]["image_id"])
    for ds in splits.values():
        for image_id, caps in by_id(ds).items():
            assert caps == written[image_id]  # annotation-id order, whitespace trimmed
    assert len(by_id(splits["train"])["1"]) == 6  # not cut to 5
    (note,) = of(caught, convert.SplitWarning)
    assert "val2017" in note and "not comparable" in note


def test_coco_2014_karpathy_restval_joins_train(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    written = make_coco(root, 2014, n_train=4, n_val=6)
    ids = sorted(map(int, written))
    train_ids, val_ids = ids[:4], ids[4:]
    entries = [
        karpathy_entry(f"COCO_train2014_{i:012d}.jpg", "train", ["t"], i, "train2014")
        for i in train_ids
    ]
    plan = ["restval", "restval", "val", "val", "test", "test"]
    entries += [
        karpathy_entry(f"COCO_val2014_{i:012d}.jpg", s, [f"raw {i}"], i, "val2014")
        for i, s in zip(val_ids, plan, strict=True)
    ]
    write_karpathy(root / "dataset_coco.json", entries, "coco")
    splits, caught = load("coco", tmp_path, root=str(root))
    check_schema(splits)
    assert [len(splits[s]) for s in SPLITS] == [6, 2, 2]
    assert set(splits["train"]["image_id"]) == {str(i) for i in train_ids + val_ids[:2]}
    assert by_id(splits["test"])[str(val_ids[4])] == [f"raw {val_ids[4]}"]
    assert not of(caught, convert.SplitWarning)


def test_coco_2017_images_with_karpathy_2014_names(tmp_path: Path) -> None:
    # Karpathy's file names 2014 files; 2017 holds the same images named by id alone.
    root = tmp_path / "coco"
    written = make_coco(root, 2017, n_train=3, n_val=3)
    ids = sorted(map(int, written))
    folders = ["train2014"] * 3 + ["val2014"] * 3
    entries = [
        karpathy_entry(f"COCO_{f}_{i:012d}.jpg", s, ["c"], i, f)
        for i, f, s in zip(
            ids, folders, ["train", "train", "train", "val", "test", "test"], strict=True
        )
    ]
    write_karpathy(root / "dataset_coco.json", entries, "coco")
    splits, _ = load("coco", tmp_path, root=str(root))
    assert [len(splits[s]) for s in SPLITS] == [3, 1, 2]
    assert splits["val"][0]["image"]["path"].endswith(f"val2017/{ids[3]:012d}.jpg")


def test_coco_missing_annotations(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    make_coco(root, 2017, 2, 2)
    (root / "annotations" / "captions_val2017.json").unlink()
    with pytest.raises(DataError, match=r"captions_val2017\.json is missing.*cocodataset\.org"):
        load("coco", tmp_path, root=str(root))


# ---------------------------------------------------------------- cache


def test_cache_reused_without_reading_annotations(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "f8k"
    make_flickr8k_kaggle(root, n=6)
    first, _ = load("flickr8k", tmp_path, root=str(root))

    def boom(*a, **k):
        raise AssertionError("annotations re-read although the cache is valid")

    monkeypatch.setattr(flickr, "_read_flickr_captions", boom)
    monkeypatch.setattr(convert, "check_images", boom)
    second, _ = load("flickr8k", tmp_path, root=str(root))
    assert list(second["train"]["image_id"]) == list(first["train"]["image_id"])
    assert len(list((tmp_path / "cache").glob("flickr8k-*"))) == 1
    info = convert.conversion_info(second["train"])
    assert info is not None and sum(info["images"].values()) == 6


def test_cache_invalidated_when_annotations_change(tmp_path: Path) -> None:
    root = tmp_path / "f8k"
    make_flickr8k_kaggle(root, n=6)
    load("flickr8k", tmp_path, root=str(root))
    text = (root / "captions.txt").read_text().replace("caption 0", "caption zero")
    (root / "captions.txt").write_text(text)
    splits, _ = load("flickr8k", tmp_path, root=str(root))
    assert any("caption zero" in c for caps in splits["train"]["captions"] for c in caps)
    assert len(list((tmp_path / "cache").glob("flickr8k-*"))) == 2
    # Other arguments are part of the key too.
    load("flickr8k", tmp_path, root=str(root), limit_train=2)
    assert len(list((tmp_path / "cache").glob("flickr8k-*"))) == 3
    assert not list((tmp_path / "cache").glob(".*tmp*"))  # no temporary folders left behind


def test_limits(tmp_path: Path) -> None:
    make_flickr8k_kaggle(tmp_path / "f8k", n=10)
    splits, _ = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"), limit_train=3, limit_test=0)
    assert [len(splits[s]) for s in SPLITS] == [3, 1, 0]


# ---------------------------------------------------------------- errors and bad images


@pytest.mark.parametrize(
    "source, url",
    [
        ("flickr8k", "kaggle.com/datasets/adityajn105/flickr8k"),
        ("flickr30k", "kaggle.com/datasets/hsankesara/flickr-image-dataset"),
        ("coco", "cocodataset.org/#download"),
    ],
)
def test_missing_root_says_how_to_get_the_data(tmp_path: Path, source: str, url: str) -> None:
    with pytest.raises(DataError) as err:
        load(source, tmp_path, root=str(tmp_path / "nowhere"))
    msg = str(err.value)
    assert "does not exist" in msg and str(tmp_path / "nowhere") in msg
    assert url in msg and "data.args.root=" in msg


def test_empty_root_names_the_expected_layout(tmp_path: Path) -> None:
    (tmp_path / "f8k").mkdir()
    with pytest.raises(DataError, match=r"no image folder.*Images/"):
        load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    (tmp_path / "f8k" / "Images").mkdir()
    (tmp_path / "f8k" / "Images" / "a.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"no captions file.*captions\.txt"):
        load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))


def test_two_corrupt_images_of_ten_are_dropped_with_one_warning(tmp_path: Path) -> None:
    make_flickr8k_kaggle(tmp_path / "f8k", n=10, corrupt=(2, 5))
    splits, caught = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    assert sum(len(ds) for ds in splits.values()) == 8
    (msg,) = of(caught, SkippedImagesWarning)
    bad = flickr_names(10)
    assert "2 of 10" in msg and bad[2] in msg and bad[5] in msg
    # Reported once: the cached load is silent about it.
    _, caught = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    assert not of(caught, SkippedImagesWarning)


def test_missing_image_files_are_dropped(tmp_path: Path) -> None:
    make_flickr8k_kaggle(tmp_path / "f8k", n=10)
    gone = flickr_names(10)[3]
    (tmp_path / "f8k" / "Images" / gone).unlink()
    splits, caught = load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    assert sum(len(ds) for ds in splits.values()) == 9
    (msg,) = of(caught, SkippedImagesWarning)
    assert gone in msg and "file not found" in msg


def test_only_corrupt_images_raise(tmp_path: Path) -> None:
    make_flickr8k_kaggle(tmp_path / "f8k", n=4, corrupt=(0, 1, 2, 3))
    with pytest.raises(DataError, match="none of the 4"):
        load("flickr8k", tmp_path, root=str(tmp_path / "f8k"))
    assert not list((tmp_path / "cache").glob("flickr8k-*"))  # nothing cached


# ---------------------------------------------------------------- Hub


def test_hub_local_folder_normalised(tmp_path: Path) -> None:
    written = write_hub_folder(tmp_path / "hubds", {"train": 4, "validation": 2, "test": 2})
    splits, _ = load(
        "hub", tmp_path, hub_id=str(tmp_path / "hubds"), hub_cache_dir=str(tmp_path / "hf")
    )
    assert [len(splits[s]) for s in SPLITS] == [4, 2, 2]
    row = splits["val"][1]
    assert row["image_id"] == "val-0000001"
    assert row["captions"] == written["validation-1"]
    assert row["image"]["bytes"]  # Hub images arrive as bytes
    assert splits["train"].features["image"] == datasets.Image(decode=False)


def test_hub_split_column_and_list_captions(tmp_path: Path) -> None:
    written = write_hub_single_split(tmp_path / "hubds", n=9)
    splits, _ = load(
        "hub",
        tmp_path,
        hub_id=str(tmp_path / "hubds"),
        hub_cache_dir=str(tmp_path / "hf"),
        image_column="img",
        caption_columns="sentences",
        id_column="name",
        split_column="split",
        splits={"train": "train", "val": "val", "test": "test"},
    )
    assert [len(splits[s]) for s in SPLITS] == [3, 3, 3]
    assert list(splits["val"]["image_id"]) == ["pic1", "pic4", "pic7"]
    for ds in splits.values():
        assert by_id(ds) == {k: written[k] for k in ds["image_id"]}


def test_hub_bad_columns(tmp_path: Path) -> None:
    write_hub_folder(tmp_path / "hubds", {"train": 2, "validation": 1, "test": 1})
    with pytest.raises(ConfigError, match="columns are image, caption_0"):
        load(
            "hub",
            tmp_path,
            hub_id=str(tmp_path / "hubds"),
            image_column="img",
            hub_cache_dir=str(tmp_path / "hf"),
        )


def test_hub_unreachable_is_a_clear_data_error(tmp_path: Path, monkeypatch) -> None:
    # Offline mode makes the failure instant here; the message is the same as a network error's.
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load("hub", tmp_path, hub_id="jxie/flickr8k", hub_cache_dir=str(tmp_path / "hf"))
    msg = str(err.value)
    assert "jxie/flickr8k" in msg and "could not be reached" in msg and "data.args.root=" in msg
    assert time.perf_counter() - start < 30


@pytest.mark.slow
def test_hub_unreachable_network(tmp_path: Path) -> None:
    """Without offline mode (conftest sets it): the real network failure, in a subprocess."""
    code = (
        "from captioning.data import load_splits\n"
        "from captioning.errors import DataError\n"
        "try:\n"
        f"    d = load_splits('hub', hub_id='jxie/flickr8k', cache_dir={str(tmp_path)!r},\n"
        f"                    hub_cache_dir={str(tmp_path / 'hf')!r}, limit_train=2)\n"
        "    print('LOADED', len(d['train']))\n"
        "except DataError as e:\n"
        "    print('DATAERROR', e)\n"
    )
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    }
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(convert.__file__).parents[2]), env.get("PYTHONPATH", "")]
    )
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    print(f"\nHub unreachable: DataError after {time.perf_counter() - start:.1f} s")
    if "LOADED" in out.stdout:  # a machine with internet: the real dataset
        assert "LOADED 2" in out.stdout
        return
    assert "DATAERROR" in out.stdout, out.stderr[-2000:]
    assert "jxie/flickr8k" in out.stdout and "could not be reached" in out.stdout
    assert "data.args.root=" in out.stdout and "Traceback" not in out.stdout


# ---------------------------------------------------------------- the staged real data (slow)


def _staged(name: str) -> Path:
    path = STAGED / name
    if not path.is_dir():
        pytest.skip(f"staged data {path} not present")
    return path


@pytest.mark.slow
def test_staged_flickr8k(tmp_path: Path) -> None:
    root = _staged("flickr8k")
    start = time.perf_counter()
    splits, caught = load("flickr8k", tmp_path, root=str(root))
    first = time.perf_counter() - start
    start = time.perf_counter()
    again, _ = load("flickr8k", tmp_path, root=str(root))
    cached = time.perf_counter() - start
    print(f"\nflickr8k: first conversion {first:.1f} s, cached load {cached:.2f} s")
    assert [len(splits[s]) for s in SPLITS] == [6000, 1000, 1000]  # Karpathy json found in root
    for ds in splits.values():
        assert set(map(len, ds["captions"])) == {5}
        assert ds[0]["image"]["bytes"] is None
    assert not of(caught, convert.SplitWarning) and not of(caught, SkippedImagesWarning)
    assert list(again["test"]["image_id"]) == list(splits["test"]["image_id"])
    assert cached < first


@pytest.mark.slow
def test_staged_coco_mini(tmp_path: Path) -> None:
    root = _staged("coco-mini")
    start = time.perf_counter()
    splits, caught = load("coco", tmp_path, root=str(root))
    first = time.perf_counter() - start
    start = time.perf_counter()
    load("coco", tmp_path, root=str(root))
    cached = time.perf_counter() - start
    print(f"\ncoco-mini: first conversion {first:.1f} s, cached load {cached:.2f} s")
    assert len(splits["train"]) == 80
    assert len(splits["val"]) + len(splits["test"]) == 79
    assert abs(len(splits["val"]) - len(splits["test"])) <= 1
    for ds in splits.values():
        assert set(map(len, ds["captions"])) == {5}
    assert "397133" in list(splits["val"]["image_id"]) + list(splits["test"]["image_id"])
    assert of(caught, convert.SplitWarning)
