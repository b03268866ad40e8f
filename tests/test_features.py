"""Feature cache: computed once per key, read memory-mapped, recomputed when a key changes."""

import numpy as np
import torch

from captioning.datamodule import CaptionDataModule
from captioning.encoders import build_encoder
from captioning.features import cache_dir_for, cache_key

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
    assert "feats" in batch and "images" not in batch
    assert batch["feats"].shape == (8, direct.shape[1], direct.shape[2])


def test_cache_reused_and_keyed(tmp_path):
    torch.manual_seed(0)
    enc = build_encoder("small_cnn", fine_tune="none")
    module(tmp_path, enc)
    dirs = set((tmp_path / "features").iterdir())
    assert len(dirs) == 3  # train, val, test
    stamps = {d: (d / "features.npy").stat().st_mtime_ns for d in dirs}
    module(tmp_path, enc)  # same key: read back, not recomputed
    assert {d: (d / "features.npy").stat().st_mtime_ns for d in dirs} == stamps

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
