"""data.flip: training samples seen mirrored at random, from a cached second view of the features."""

import numpy as np
import pytest
import torch
from PIL import ImageOps
from torch.utils.data import DataLoader, RandomSampler

from captioning.data.dataset import CaptionDataset, FlipSampler, collate, flip_words
from captioning.data.images import load_rgb
from captioning.encoders import Preprocess, build_encoder
from captioning.errors import ConfigError
from captioning.features import cache_dir_for, cache_key
from captioning.training.datamodule import CaptionDataModule
from captioning.vocab import Vocab
from conftest import compose_cfg

DATA = {
    "name": "synthetic",
    "args": {"num_train": 24, "num_val": 8, "num_test": 8},
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_workers": 0,
}
MIRROR = {"left": "right", "right": "left"}


def frozen() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("small_cnn", fine_tune="none").eval()


def cached(cache, encoder, seed: int = 0, **extra) -> CaptionDataModule:
    dm = CaptionDataModule({**DATA, **extra}, cache_dir=str(cache), seed=seed)
    assert dm.use_feature_cache(encoder)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def batches(dm: CaptionDataModule, epochs: int = 1) -> list:
    loader = dm.train_dataloader()
    return [b for _ in range(epochs) for b in loader]


def same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.captions, y.captions) and torch.equal(x.feats, y.feats)
        for x, y in zip(a, b, strict=True)
    )


def test_the_flipped_view_has_its_own_cache_key_and_the_plain_key_is_unchanged():
    enc = frozen()
    plain = cache_key(enc, "abc")
    assert "view" not in plain and cache_key(enc, "abc", "plain") == plain
    assert cache_key(enc, "abc", "hflip") == {**plain, "view": "hflip"}
    assert cache_dir_for("c", cache_key(enc, "abc", "hflip")) != cache_dir_for("c", plain)
    with pytest.raises(ValueError, match="unknown view"):
        cache_key(enc, "abc", "vflip")


def test_flip_adds_one_cache_of_the_training_images_mirrored(tmp_path):
    enc = frozen()
    cached(tmp_path, enc)
    plain_dirs = set((tmp_path / "features").iterdir())
    dm = cached(tmp_path, enc, flip=True)
    new = set((tmp_path / "features").iterdir()) - plain_dirs
    assert new == {dm._feature_dir("train", "hflip")}  # the plain caches are found, not redone
    ds = dm.dataset("train")
    # The encoder run on each training image mirrored (the PIL image, before preprocessing).
    images = [ds.transform(ImageOps.mirror(load_rgb(ds.ds[i]["image"]))) for i in range(len(ds.ds))]
    with torch.no_grad():
        direct = enc(torch.stack(images))  # (M, N, D)
    flipped = torch.from_numpy(np.asarray(ds.flipped_features, dtype=np.float32))
    torch.testing.assert_close(flipped, direct, rtol=1e-3, atol=1e-3)  # fp16 storage
    plain = torch.from_numpy(np.asarray(ds.features, dtype=np.float32))
    assert not torch.allclose(plain, flipped, atol=1e-2)  # the scenes are not symmetric
    assert all(dm.dataset(split).flipped_features is None for split in ("val", "test"))


def test_flipped_samples_swap_left_and_right_in_their_captions(tmp_path):
    dm = cached(tmp_path, frozen(), flip=True)
    ds, vocab = dm.dataset("train"), dm.vocab
    swapped = 0
    for k in range(len(ds)):
        i, _ = ds.index[k]
        plain, flipped = ds[k], ds[(k, True)]
        words = vocab.decode(plain["caption"].tolist()).split()
        mirrored = vocab.decode(flipped["caption"].tolist()).split()
        assert mirrored == [MIRROR.get(w, w) for w in words]
        swapped += any(w in MIRROR for w in words)
        assert torch.equal(ds[(k, False)]["caption"], plain["caption"])
        assert torch.equal(ds[(k, False)]["feats"], plain["feats"])
        assert torch.equal(flipped["feats"], torch.from_numpy(ds.flipped_features[i].astype("f4")))
    assert swapped > 10  # the premise: the synthetic captions say left and right
    with pytest.raises(ValueError, match="only training samples"):
        dm.dataset("val")[(0, True)]


def test_a_word_whose_partner_is_not_in_the_vocabulary_is_never_flipped():
    import io

    import datasets
    from PIL import Image

    def half_and_half(i: int) -> bytes:  # left half dark, right half light: not symmetric
        img = Image.new("RGB", (24, 16), (20 * i, 0, 0))
        img.paste((255, 255, 255), (12, 0, 24, 16))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        return buf.getvalue()

    captions = [["a dog left of a cat"], ["a red thing"]]
    rows = {
        "image_id": ["a", "b"],
        "image": [{"bytes": half_and_half(i), "path": None} for i in range(2)],
        "captions": captions,
    }
    hf = datasets.Dataset.from_dict(
        rows,
        features=datasets.Features(
            {
                "image_id": datasets.Value("string"),
                "image": datasets.Image(decode=False),
                "captions": datasets.List(datasets.Value("string")),
            }
        ),
    )
    vocab = Vocab.build([c for cs in captions for c in cs])
    assert flip_words(vocab)[1] == vocab.stoi["left"]
    pp = Preprocess(16, 16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), center_crop=False)
    ds = CaptionDataset(hf, vocab, pp, train=True, preload=True)
    assert not torch.equal(ds[1]["image"], ds[1]["image"].flip(-1))  # the premise: not symmetric
    # "left" would have to read "right", which the vocabulary lacks: that sample stays plain
    for key in ("image", "caption"):
        assert torch.equal(ds[(0, True)][key], ds[0][key])
    # a trainable encoder sees the image tensor flipped on its width axis
    assert torch.equal(ds[(1, True)]["image"], ds[1]["image"].flip(-1))
    assert torch.equal(ds[(1, True)]["caption"], ds[1]["caption"])


def test_about_half_the_samples_are_flipped_the_same_under_the_same_seed():
    def draw(seed: int) -> list[tuple[int, bool]]:
        return list(FlipSampler(4000, torch.Generator().manual_seed(seed)))

    pairs = draw(0)
    assert sorted(k for k, _ in pairs) == list(range(4000))  # each sample once an epoch
    assert abs(sum(f for _, f in pairs) / 4000 - 0.5) < 0.05  # 4.5 standard deviations
    assert draw(0) == pairs and draw(1) != pairs
    g = torch.Generator().manual_seed(0)
    sampler = FlipSampler(4000, g)
    assert list(sampler) == pairs and list(sampler) != pairs  # each epoch draws afresh


def test_the_training_loader_flips_about_half_reproducibly(tmp_path):
    dm = cached(tmp_path, frozen(), seed=3, flip=True)
    ds = dm.dataset("train")
    plain = torch.from_numpy(np.asarray(ds.features, dtype=np.float32))
    flipped = torch.from_numpy(np.asarray(ds.flipped_features, dtype=np.float32))

    def view(row: torch.Tensor) -> str:
        if any(torch.equal(row, f) for f in flipped):
            return "hflip"
        assert any(torch.equal(row, p) for p in plain)
        return "plain"

    epoch = batches(dm)
    views = [view(row) for b in epoch for row in b.feats]
    assert len(views) == len(ds) == 120
    assert 36 <= views.count("hflip") <= 84  # binomial(120, 0.5): 4.4 standard deviations
    again = cached(tmp_path, frozen(), seed=3, flip=True)
    assert same_batches(batches(again, epochs=2), batches(dm, epochs=2))
    other = cached(tmp_path, frozen(), seed=4, flip=True)
    assert not same_batches(batches(other), epoch)
    val, vds = next(iter(dm.val_dataloader())), dm.dataset("val")  # never flipped
    assert all(torch.equal(row, vds[k]["feats"]) for k, row in enumerate(val.feats))


def test_flip_off_gives_the_batches_of_a_plain_shuffled_loader(tmp_path):
    enc = frozen()
    default = cached(tmp_path, enc)  # a data config written before data.flip existed
    off = cached(tmp_path, enc, flip=False)
    assert isinstance(off.train_dataloader().sampler, RandomSampler)
    ds = default.dataset("train")
    plain = DataLoader(
        ds,
        batch_size=DATA["batch_size"],
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(0),
    )
    expected = [b for _ in range(2) for b in plain]
    assert same_batches(batches(default, epochs=2), expected)
    assert same_batches(batches(off, epochs=2), expected)
    assert not same_batches(batches(cached(tmp_path, enc, flip=True), epochs=2), expected)


def test_data_flip_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.flip must be true or false"):
        CaptionDataModule({**DATA, "flip": "yes"}, cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="not scst"):
        CaptionDataModule({**DATA, "flip": True}, cache_dir=str(tmp_path), train_per_image=True)


@pytest.mark.parametrize("data", ["synthetic", "flickr8k", "flickr30k", "coco"])
def test_every_data_config_has_flip_off(data):
    assert compose_cfg("train", [f"data={data}"]).data.flip is False
