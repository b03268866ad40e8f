"""Feature cache: a frozen encoder's region features, computed once per split and stored on disk.

Keyed by (encoder, weights, preprocessing, grid, dataset split), so changing any of them
computes the features again. Stored as one fp16 ``.npy`` per split and read back memory-mapped,
so resident memory stays bounded however large the dataset is.
"""

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .encoders import Encoder
from .errors import DataError

log = logging.getLogger(__name__)

FORMAT = 1


def cache_key(encoder: Encoder, split_fingerprint: str) -> dict[str, Any]:
    """Everything the cached features depend on."""
    return {
        "format": FORMAT,
        "encoder": encoder.name,
        "weights": encoder.weights_id,
        "preprocess": _preprocess_key(encoder.preprocess.to_dict()),
        "grid": encoder.grid,
        "split": split_fingerprint,
    }


def _preprocess_key(pp: dict[str, Any]) -> dict[str, Any]:
    # The default centre crop is left out so that caches written before `center_crop` existed
    # keep their keys (recomputing COCO's features takes hours).
    return {k: v for k, v in pp.items() if not (k == "center_crop" and v)}


def weights_digest(module: torch.nn.Module) -> str:
    """A short hash of a module's weights, for weights that have no name (fine-tuned ones)."""
    h = hashlib.sha1()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def cache_dir_for(root: str | Path, key: dict[str, Any]) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / "features" / f"{key['encoder']}-{digest}"


class _Images(Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.image_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.dataset.image_tensor(i)


@torch.no_grad()
def compute_features(
    encoder: Encoder,
    dataset,
    out_dir: Path,
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
) -> Path:
    """Run the frozen encoder over every image of `dataset` into out_dir/features.npy (fp16)."""
    if out_dir.is_dir():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        was_training = encoder.training
        encoder.eval().to(device)
        loader = DataLoader(_Images(dataset), batch_size=batch_size, num_workers=num_workers)
        mm = None
        row = 0
        total = len(dataset.image_ids)
        log.info("computing %s features of %d images into %s", encoder.name, total, out_dir)
        next_report = total // 10
        for images in loader:
            feats = encoder(images.to(device)).float().cpu().numpy()  # (B, N, D)
            if mm is None:
                shape = (len(dataset.image_ids), *feats.shape[1:])
                mm = np.lib.format.open_memmap(tmp / "features.npy", "w+", np.float16, shape)
            if not np.isfinite(feats).all() or np.abs(feats).max() > np.finfo(np.float16).max:
                raise DataError(
                    f"{encoder.name} features are not finite or exceed the fp16 range of the "
                    f"cache (max |x| = {np.abs(feats).max():.3g}): are the encoder's weights "
                    "those of a trained network? Train with data.feature_cache=false instead"
                )
            mm[row : row + len(feats)] = feats
            row += len(feats)
            if row >= next_report and row < total:  # long for big encoders on a CPU
                log.info("  %d / %d images", row, total)
                next_report += max(total // 10, 1)
        mm.flush()
        (tmp / "image_ids.json").write_text(json.dumps(dataset.image_ids))
        encoder.train(was_training)
        try:
            os.rename(tmp, out_dir)  # atomic: a half-written cache is never seen
        except OSError:  # another process finished first; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("cached %d feature maps %s in %s", row, tuple(mm.shape[1:]), out_dir)
    return out_dir


def load_features(out_dir: Path, image_ids: list[str]) -> np.ndarray:
    """The memory-mapped (M, N, D) fp16 features, checked against the dataset's images."""
    cached_ids = json.loads((out_dir / "image_ids.json").read_text())
    if cached_ids != image_ids:
        raise RuntimeError(f"feature cache {out_dir} does not match the dataset's images")
    return np.load(out_dir / "features.npy", mmap_mode="r")
