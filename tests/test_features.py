"""Feature cache: computed once per key, read memory-mapped, recomputed when a key changes."""

import json

import numpy as np
import torch

from captioning.encoders import build_encoder
from captioning.features import cache_dir_for, cache_key
from captioning.training.datamodule import CaptionDataModule

DATA = {
    "name": "synthetic",
    "args": {"num_train": 24, "num_val": 8, "num_test": 8},
    "batch_size": 8,
    "eval_batch_size": 8,
    "num_workers": 0,
}


def module(cache, encoder, **extra):
    dm = CaptionDataModule({**DATA, **extra}, cache_dir=str(cache))
    assert dm.use_feature_cache(encoder)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_cached_features_equal_the_encoder_output(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", fine_tune="none").eval()
    dm = module(tmp_path, enc)
    ds = dm.dataset("val")
    assert isinstance(ds.features, np.memmap) or isinstance(ds.features.base, np.memmap)
    with torch.no_grad():
        direct = enc(torch.stack([ds.image_tensor(i) for i in range(len(ds.image_ids))]))
    cached = torch.stack([ds[i]["feats"] for i in range(len(ds))])
    assert ds.features.dtype == np.float16
    torch.testing.assert_close(cached, direct, rtol=1e-3, atol=1e-3)  # fp16 storage
    batch = next(iter(dm.train_dataloader()))
    assert batch.feats is not None and batch.images is None
    assert batch.feats.shape == (8, direct.shape[1], direct.shape[2])


def test_cache_reused_and_keyed(tmp_path, caplog):
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", fine_tune="none")
    module(tmp_path, enc)
    dirs = set((tmp_path / "features").iterdir())
    assert len(dirs) == 3  # train, val, test
    stamps = {d: (d / "features.npy").stat().st_mtime_ns for d in dirs}
    caplog.clear()
    with caplog.at_level("INFO", logger="captioning.features"):
        module(tmp_path, enc)  # same key: read back, not recomputed
    assert {d: (d / "features.npy").stat().st_mtime_ns for d in dirs} == stamps
    # the log says so, once per split (a sweep's later jobs show they share the first's work)
    reads = [r.getMessage() for r in caplog.records if "from the cache" in r.getMessage()]
    assert len(reads) == 3 and all(r.startswith("reading small_cnn features of") for r in reads)
    assert not [r for r in caplog.records if "computing" in r.getMessage()]

    module(tmp_path, build_encoder("small_cnn", fine_tune="none", grid=4))  # other grid
    assert len(set((tmp_path / "features").iterdir()) - dirs) == 3
    dirs = set((tmp_path / "features").iterdir())
    whole = build_encoder("small_cnn", fine_tune="none", center_crop=False)  # other pixels
    whole.load_state_dict(enc.state_dict())
    module(tmp_path, whole)
    assert len(set((tmp_path / "features").iterdir()) - dirs) == 3


def test_trainable_encoder_does_not_cache(tmp_path):
    dm = CaptionDataModule(DATA, cache_dir=str(tmp_path))
    assert not dm.use_feature_cache(build_encoder("small_cnn", fine_tune="all"))


def test_features_beyond_fp16_are_an_error_not_inf(tmp_path):
    """An encoder whose features overflow fp16 (e.g. an untrained deep net) gets a clear error."""
    import pytest

    from captioning.errors import DataError

    enc = build_encoder("small_cnn", fine_tune="none")
    with torch.no_grad():
        for p in enc.parameters():
            p.mul_(1e3)
    with pytest.raises(DataError, match="fp16 range"):
        module(tmp_path, enc)
    assert not any((tmp_path / "features").glob("*/features.npy"))  # nothing half-written kept


def test_default_crop_keeps_the_keys_of_caches_written_before_the_option():
    enc = build_encoder("efficientnet_lite0", pretrained=False, grid=None)
    pp = enc.preprocess
    before = {  # the key as written before `center_crop` existed
        "format": 1,
        "encoder": "efficientnet_lite0",
        "weights": "random",
        "preprocess": {
            "image_size": pp.image_size,
            "resize_size": pp.resize_size,
            "mean": list(pp.mean),
            "std": list(pp.std),
            "interpolation": pp.interpolation,
        },
        "grid": None,
        "split": "abc",
    }
    assert cache_key(enc, "abc") == before
    whole = build_encoder("efficientnet_lite0", pretrained=False, grid=None, center_crop=False)
    assert cache_dir_for("c", cache_key(whole, "abc")) != cache_dir_for("c", before)


class CountingEncoder(torch.nn.Module):
    """A frozen "encoder" that counts the images it encodes and can be stopped after k batches."""

    name = "counting"

    def __init__(self, stop_after: int | None = None):
        super().__init__()
        self.images = 0
        self.batches = 0
        self.stop_after = stop_after

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, N=4, D=3)
        if self.stop_after is not None and self.batches == self.stop_after:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the extraction
        self.batches += 1
        self.images += x.size(0)
        return x.mean(dim=(2, 3)).unsqueeze(1).repeat(1, 4, 1) + torch.arange(4.0).view(1, 4, 1)


class Images:
    """What compute_features reads from a dataset: ids and one image tensor per index."""

    def __init__(self, n: int):
        self.image_ids = [f"img{i}" for i in range(n)]

    def image_tensor(self, i: int) -> torch.Tensor:
        return torch.full((3, 2, 2), float(i))


def test_an_interrupted_extraction_continues_where_it_stopped(tmp_path, caplog):
    import pytest

    from captioning.features import compute_features, load_features

    caplog.set_level("INFO", logger="captioning.features")
    data = Images(50)
    out = tmp_path / "features" / "counting-0123"
    with pytest.raises(KeyboardInterrupt):
        compute_features(CountingEncoder(stop_after=3), data, out, batch_size=8)
    # Three batches of 8 are kept on disk, but nothing claims to be the complete cache.
    assert not out.exists()
    assert json.loads((tmp_path / "features" / "counting-0123.partial" / "manifest.json")
                      .read_text())["done"] == 24  # fmt: skip
    assert "next run continues" in caplog.text

    encoder = CountingEncoder()
    compute_features(encoder, data, out, batch_size=8)
    assert encoder.images == 50 - 24  # only the rest was encoded
    assert "24 done by an earlier run" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == ["features.npy", "image_ids.json"]
    assert not (tmp_path / "features" / "counting-0123.partial").exists()

    whole = tmp_path / "whole"
    compute_features(CountingEncoder(), data, whole, batch_size=8)  # never interrupted
    resumed = load_features(out, data.image_ids)
    np.testing.assert_array_equal(resumed, load_features(whole, data.image_ids))
    assert resumed.shape == (50, 4, 3)


def test_a_partial_cache_of_other_images_is_not_reused(tmp_path):
    import pytest

    from captioning.features import compute_features

    out = tmp_path / "counting-0123"
    with pytest.raises(KeyboardInterrupt):
        compute_features(CountingEncoder(stop_after=2), Images(30), out, batch_size=8)
    encoder = CountingEncoder()
    compute_features(encoder, Images(31), out, batch_size=8)  # not the images it was for
    assert encoder.images == 31


def test_extraction_says_its_rate_and_time_left_without_a_terminal(tmp_path, caplog, monkeypatch):
    from captioning import features

    monkeypatch.setattr(features, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level("INFO", logger="captioning.features"):
        features.compute_features(CountingEncoder(), Images(20), tmp_path / "c", batch_size=8)
    lines = [r.getMessage() for r in caplog.records if "images/s" in r.getMessage()]
    assert lines[0].startswith("  8 / 20 images (40%)") and " left" in lines[0]
    assert lines[-1].startswith("  20 / 20 images (100%)")


def test_the_datamodule_continues_an_interrupted_cache(tmp_path, monkeypatch):
    import pytest

    torch.manual_seed(0)
    enc = build_encoder("small_cnn", fine_tune="none")
    calls = []
    forward = type(enc).forward

    def counted(self, x):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(x.size(0))
        return forward(self, x)

    monkeypatch.setattr(type(enc), "forward", counted)
    with pytest.raises(KeyboardInterrupt):
        module(tmp_path, enc)  # train: 24 images in batches of 8; stopped after 16
    monkeypatch.setattr(
        type(enc), "forward", lambda self, x: calls.append(x.size(0)) or forward(self, x)
    )
    dm = module(tmp_path, enc)
    assert sum(calls) == 16 + (24 - 16) + 8 + 8  # the rest of train, then val and test
    assert len(dm.dataset("train").features) == 24
