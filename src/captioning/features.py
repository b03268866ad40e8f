"""Feature cache: a frozen encoder's region features, computed once per split and stored on disk.

Keyed by (encoder, weights, preprocessing, grid, dataset split), so changing any of them
computes the features again. Stored as one fp16 ``.npy`` per split and read back memory-mapped,
so resident memory stays bounded however large the dataset is. The training split may have a
second view, its images mirrored left to right (`data.flip`), keyed with ``view: hflip``.

Extraction can take long (Flickr8k with a large encoder on a CPU: minutes to tens of minutes),
so it shows its rate and time left and survives an interruption. It writes into
``<key dir>.partial/``: the features file at its full size, and ``manifest.json`` saying how
many leading images are done. After each batch the rows are flushed to disk *before* the
manifest (replaced atomically) counts them, so a kill at any moment loses at most one batch,
and the next run continues from the manifest. Only a complete split is renamed to the key
directory, the one place the cache is read from: a partial cache is never mistaken for one.
"""

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .encoders import Encoder
from .errors import DataError
from .fsutil import atomic_write_text

log = logging.getLogger(__name__)

FORMAT = 1
VIEWS = ("plain", "hflip")  # the images as they are; mirrored left to right


def cache_key(encoder: Encoder, split_fingerprint: str, view: str = "plain") -> dict[str, Any]:
    """Everything the cached features depend on."""
    if view not in VIEWS:
        raise ValueError(f"unknown view {view!r}; valid choices: {', '.join(VIEWS)}")
    key = {
        "format": FORMAT,
        "encoder": encoder.name,
        "weights": encoder.weights_id,
        "preprocess": _preprocess_key(encoder.preprocess.to_dict()),
        "grid": encoder.grid,
        "split": split_fingerprint,
    }
    if view != "plain":  # only then: every cache written before views existed keeps its key
        key["view"] = view
    return key


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


class Mirrored:
    """A dataset's images mirrored left to right (the "hflip" view), for `compute_features`.

    The preprocessed tensor is flipped on its width axis: what a trainable encoder sees of a
    mirrored training sample too (`CaptionDataset`).
    """

    def __init__(self, dataset):
        self.dataset = dataset
        self.image_ids = dataset.image_ids

    def image_tensor(self, i: int) -> torch.Tensor:
        return self.dataset.image_tensor(i).flip(-1)  # (3, S, S)


def _ids_digest(image_ids: list[str]) -> str:
    return hashlib.sha1(json.dumps(image_ids).encode()).hexdigest()


def _write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data))  # a reader sees the old manifest or the new one


@contextmanager
def _exclusive(lock: Path):
    """One extraction per cache directory at a time (two runs started together wait)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    with lock.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


PROGRESS_EVERY_S = 30.0  # without a terminal: one progress line this often


class _Progress:
    """A tqdm bar on a terminal; without one, a log line with rate and time left."""

    def __init__(self, total: int, done: int, what: str, every_s: float | None = None):
        self.total, self.done, self.first = total, done, done
        self.start = self.last = time.perf_counter()
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="img", desc=what, dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if now - self.last < self.every_s and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.first) / max(now - self.start, 1e-9)
        left = (self.total - self.done) / rate if rate > 0 else float("inf")
        log.info(
            "  %d / %d images (%.0f%%), %.1f images/s, %s left",
            self.done,
            self.total,
            100 * self.done / self.total,
            rate,
            _duration(left),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    if not np.isfinite(seconds):
        return "unknown time"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else f"{m} min {s:02d} s" if m else f"{s} s"


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
    """Run the frozen encoder over every image of `dataset` into out_dir/features.npy (fp16).

    Continues an interrupted extraction of the same cache (see the module docstring).
    """
    if out_dir.is_dir():  # computed by an earlier run (in a sweep: that encoder's first job)
        log.info(
            "reading %s features of %d images from the cache %s",
            encoder.name, len(dataset.image_ids), out_dir,
        )  # fmt: skip
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(exist_ok=True)
    with _exclusive(partial / "lock"):
        if out_dir.is_dir():  # another run finished it while this one waited
            return out_dir
        return _extract(encoder, dataset, out_dir, partial, batch_size, num_workers, device)


def _extract(
    encoder: Encoder,
    dataset,
    out_dir: Path,
    partial: Path,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
) -> Path:
    ids = list(dataset.image_ids)
    total = len(ids)
    manifest_path, features_path = partial / "manifest.json", partial / "features.npy"
    manifest: dict[str, Any] = {}
    with suppress(OSError, ValueError):
        manifest = json.loads(manifest_path.read_text())
    done = int(manifest.get("done", 0))
    same = manifest.get("images") == total and manifest.get("ids") == _ids_digest(ids)
    if not (same and 0 < done <= total and features_path.is_file()):
        done = 0  # nothing usable: start afresh
    mm = np.load(features_path, mmap_mode="r+") if done else None
    if done:
        log.info(
            "continuing %s features of %d images into %s: %d done by an earlier run",
            encoder.name, total, out_dir, done,
        )  # fmt: skip
    else:
        log.info("computing %s features of %d images into %s", encoder.name, total, out_dir)
    was_training = encoder.training
    encoder.eval().to(device)
    todo = Subset(_Images(dataset), range(done, total))
    loader = DataLoader(todo, batch_size=batch_size, num_workers=num_workers)
    progress = _Progress(total, done, f"{encoder.name} features")
    try:
        for images in loader:
            feats = encoder(images.to(device)).float().cpu().numpy()  # (B, N, D)
            if not np.isfinite(feats).all() or np.abs(feats).max() > np.finfo(np.float16).max:
                raise DataError(
                    f"{encoder.name} features are not finite or exceed the fp16 range of the "
                    f"cache (max |x| = {np.abs(feats).max():.3g}): are the encoder's weights "
                    "those of a trained network? Train with data.feature_cache=false instead"
                )
            if mm is None:
                shape = (total, *feats.shape[1:])
                mm = np.lib.format.open_memmap(features_path, "w+", np.float16, shape)
            mm[done : done + len(feats)] = feats
            mm.flush()  # the rows are on disk before the manifest counts them
            done += len(feats)
            _write_json(manifest_path, {"images": total, "ids": _ids_digest(ids), "done": done})
            progress.update(len(feats))
    except BaseException:
        progress.close()
        if not done:
            shutil.rmtree(partial, ignore_errors=True)
        else:
            log.info(
                "feature extraction stopped after %d of %d images; they are kept in %s and the "
                "next run continues from there",
                done, total, partial,
            )  # fmt: skip
        raise
    finally:
        encoder.train(was_training)
    progress.close()
    (partial / "image_ids.json").write_text(json.dumps(ids))
    shape = tuple(mm.shape[1:])
    del mm
    for name in ("manifest.json", "lock"):
        (partial / name).unlink(missing_ok=True)
    try:
        os.rename(partial, out_dir)  # atomic: the key directory appears complete or not at all
    except OSError:  # another process finished first; theirs is as good as ours
        shutil.rmtree(partial, ignore_errors=True)
    log.info("cached %d feature maps %s in %s", total, shape, out_dir)
    return out_dir


def load_features(out_dir: Path, image_ids: list[str]) -> np.ndarray:
    """The memory-mapped (M, N, D) fp16 features, checked against the dataset's images."""
    cached_ids = json.loads((out_dir / "image_ids.json").read_text())
    if cached_ids != image_ids:
        raise RuntimeError(f"feature cache {out_dir} does not match the dataset's images")
    return np.load(out_dir / "features.npy", mmap_mode="r")
