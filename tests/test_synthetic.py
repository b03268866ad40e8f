"""The synthetic source: deterministic, cached, and captions that agree with what is drawn."""

import io
import re

import datasets
import numpy as np
import pytest
from PIL import Image

from captioning.data import SOURCES, SPLITS, load_splits
from captioning.data import synthetic as syn
from captioning.errors import ConfigError

SMALL = dict(num_train=40, num_val=12, num_test=12)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    return syn.build_synthetic(str(tmp_path_factory.mktemp("cache")), seed=3, **SMALL)


@pytest.fixture(scope="module")
def scenes():
    """Many scenes straight from the generator, enough to see every word and layout."""
    return [syn.make_scene(np.random.default_rng([7, i])) for i in range(400)]


def _rgb(row) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"))


def _centre(box) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def test_registered_and_loadable(tmp_path):
    assert "synthetic" in SOURCES
    out = load_splits("synthetic", cache_dir=str(tmp_path), num_train=2, num_val=1, num_test=1)
    assert {k: len(v) for k, v in out.items()} == {"train": 2, "val": 1, "test": 1}


def test_schema(splits):
    assert set(splits) == set(SPLITS)
    for split, ds in splits.items():
        assert ds.features == syn.features()
        assert isinstance(ds.features["image"], datasets.Image) and not ds.features["image"].decode
        row = ds[0]
        assert row["image_id"] == f"synthetic-{split}-000000"
        assert row["image"]["bytes"][:8] == b"\x89PNG\r\n\x1a\n"
        assert len(row["boxes"]) == len(row["objects"]) >= 1
        assert Image.open(io.BytesIO(row["image"]["bytes"])).size == (64, 64)


def test_deterministic_across_cache_dirs(tmp_path, splits):
    again = syn.build_synthetic(str(tmp_path), seed=3, **SMALL)
    for split in SPLITS:
        assert again[split].to_dict() == splits[split].to_dict()


def test_image_depends_only_on_its_index(splits):
    # Generating fewer images, or one split alone, gives the same first images.
    alone = syn.generate_split("test", 5, seed=3)
    assert alone.to_dict() == splits["test"].select(range(5)).to_dict()


def test_seed_changes_images(tmp_path, splits):
    other = syn.build_synthetic(str(tmp_path), seed=4, **SMALL)
    assert other["train"][0]["image"]["bytes"] != splits["train"][0]["image"]["bytes"]


def test_splits_disjoint(splits):
    seen: dict[bytes, str] = {}
    for split, ds in splits.items():
        for row in ds:
            assert seen.setdefault(row["image"]["bytes"], split) == split
    ids = [i for ds in splits.values() for i in ds["image_id"]]
    assert len(ids) == len(set(ids))


def test_five_short_captions(scenes):
    for scene in scenes:
        assert len(scene.captions) == 5
        assert all(1 <= len(c.split()) <= 20 for c in scene.captions)
        assert len(set(scene.captions)) == 5


def test_vocabulary_small(scenes):
    vocab = {w for s in scenes for c in s.captions for w in c.split()}
    assert len(vocab) < 60
    assert set(syn.SHAPES) | set(syn.COLOURS) | set(syn.SIZES) <= vocab
    # No punctuation or capitals for a tokeniser to trip on.
    assert all(re.fullmatch(r"[a-z]+", w) for w in vocab)


def test_captions_name_every_object(scenes):
    for scene in scenes:
        names = [f"{o.colour} {o.shape}" for o in scene.objects]
        canonical = scene.captions[0]
        # The canonical caption names the objects in order, with their sizes.
        positions = [canonical.index(f"a {o.phrase}") for o in scene.objects]
        assert positions == sorted(positions)
        for caption in scene.captions:
            assert all(name in caption for name in names), caption


def test_boxes_match_drawn_objects(splits):
    for row in splits["train"]:
        img = _rgb(row).astype(int)
        h, w, _ = img.shape
        covered = np.zeros((h, w), bool)
        for box, phrase in zip(row["boxes"], row["objects"], strict=True):
            x0, y0, x1, y1 = box
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
            cx, cy = _centre(box)
            colour = syn.COLOURS[phrase.split()[1]]
            assert np.abs(img[int(cy * h), int(cx * w)] - colour).max() <= 2, phrase
            covered[int(y0 * h) - 1 : int(y1 * h) + 2, int(x0 * w) - 1 : int(x1 * w) + 2] = True
        # Away from the objects, the background stays near-grey: nothing there looks like an object.
        saturation = img.max(axis=-1) - img.min(axis=-1)
        assert saturation[~covered].max() < 60


def test_sizes_distinct_and_objects_apart(scenes):
    widths = {"small": [], "large": []}
    for scene in scenes:
        for o in scene.objects:
            widths[o.size].append(o.box[2] - o.box[0])
        for i, a in enumerate(scene.objects):
            for b in scene.objects[i + 1 :]:
                gap_x = max(a.box[0], b.box[0]) - min(a.box[2], b.box[2])
                gap_y = max(a.box[1], b.box[1]) - min(a.box[3], b.box[3])
                assert max(gap_x, gap_y) > 0.03  # disjoint, with a margin
    assert max(widths["small"]) * 1.4 < min(widths["large"])


@pytest.mark.parametrize("n_objects", [2, 3])
def test_relations_agree_with_boxes(scenes, n_objects):
    picked = [s for s in scenes if len(s.objects) == n_objects]
    assert len(picked) > 50
    for scene in picked:
        centres = np.array([_centre(o.box) for o in scene.objects])
        horizontal = "to the left of" in scene.captions[0]
        assert horizontal != (" above " in scene.captions[0])
        along, across = (0, 1) if horizontal else (1, 0)
        # Objects come in order along the named axis, which is the axis of the larger offset.
        steps = np.diff(centres, axis=0)
        assert np.all(steps[:, along] > 0.1), scene.captions[0]
        assert np.all(np.abs(steps[:, along]) >= 1.5 * np.abs(steps[:, across]))
    assert {"x", "y"} == {s.axis for s in picked}


def test_second_call_loads_from_cache(tmp_path, monkeypatch):
    first = syn.build_synthetic(str(tmp_path), num_train=3, num_val=2, num_test=2)

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of loading the cache")

    monkeypatch.setattr(syn, "generate_split", fail)
    second = syn.build_synthetic(str(tmp_path), num_train=3, num_val=2, num_test=2)
    assert second["val"].to_dict() == first["val"].to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [syn.cache_path(tmp_path, **_args(3, 2, 2)).name]


def _args(num_train: int, num_val: int, num_test: int) -> dict[str, int]:
    return dict(
        seed=0,
        image_size=64,
        max_objects=3,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
    )


def test_interrupted_write_leaves_no_cache(tmp_path, monkeypatch):
    def crash(self, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash)
    with pytest.raises(KeyboardInterrupt):
        syn.build_synthetic(str(tmp_path), num_train=2, num_val=1, num_test=1)
    assert list(tmp_path.iterdir()) == []  # no half-written cache, no leftover temporary folder


def test_cache_key_covers_arguments(tmp_path):
    keys = {
        syn.cache_path(tmp_path, **_args(3, 2, 2)),
        syn.cache_path(tmp_path, **_args(3, 2, 1)),
        syn.cache_path(tmp_path, **{**_args(3, 2, 2), "seed": 1}),
    }
    assert len(keys) == 3


@pytest.mark.parametrize(
    "bad", [dict(max_objects=0), dict(max_objects=4), dict(num_train=-1), dict(image_size=16)]
)
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(ConfigError):
        syn.build_synthetic(str(tmp_path), **bad)


def test_single_object_limit_and_larger_images(tmp_path):
    out = syn.build_synthetic(
        str(tmp_path), num_train=8, num_val=1, num_test=1, image_size=96, max_objects=1
    )
    assert all(len(objs) == 1 for objs in out["train"]["objects"])
    assert Image.open(io.BytesIO(out["train"][0]["image"]["bytes"])).size == (96, 96)


def test_preview(tmp_path, splits):
    syn.preview(splits["train"], tmp_path / "grid.png", n=6)
    assert Image.open(tmp_path / "grid.png").size[0] > 0
