"""LightningDataModule: any registered source -> vocabulary from train -> padded batches."""

import hashlib
import json
import logging
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader, Dataset

from .data import load_splits
from .data.images import ImageDecodeError, load_rgb, warn_skipped
from .encoders import Encoder, Preprocess
from .errors import ConfigError, DataError
from .features import cache_dir_for, cache_key, compute_features, load_features
from .transforms import make_transform
from .vocab import Vocab, tokenize

log = logging.getLogger(__name__)


class CaptionDataset(Dataset):
    """Rows of a `datasets.Dataset` as tensors.

    Training yields one sample per (image, caption) pair; evaluation one per image with all its
    references. Images that fail to decode are dropped up front (counted, one warning), so a
    DataLoader worker never meets them.
    """

    def __init__(
        self,
        hf_ds,
        vocab: Vocab,
        preprocess: Preprocess,
        *,
        train: bool,
        preload: bool = False,
        name: str = "",
    ):
        self.ds = hf_ds
        self.vocab = vocab
        self.transform = make_transform(preprocess)
        self.train = train
        self.image_ids: list[str] = list(hf_ds["image_id"])
        self.refs: list[list[str]] = [list(c) for c in hf_ds["captions"]]
        self.images: Tensor | None = None
        self.features: np.ndarray | None = None  # (M, N, D) fp16, memory-mapped
        # JPEG draft mode decodes big photos at a reduced scale, no smaller than needed.
        self.target_size = preprocess.resize_size
        if preload:  # small datasets: decode once, keep (M, 3, S, S) in memory
            self.images = self._preload(name)
        self.refs, self.dropped_captions, self.dropped_images = drop_empty_captions(self.refs, name)
        encoded = [[torch.tensor(vocab.encode(c)) for c in refs] for refs in self.refs]
        self.encoded = encoded
        # An image left without captions yields no sample (and is not scored).
        if train:
            self.index = [(i, j) for i, caps in enumerate(encoded) for j in range(len(caps))]
        else:
            self.index = [(i, 0) for i in range(len(encoded)) if encoded[i]]

    def _preload(self, name: str) -> Tensor:
        xs, keep, failures = [], [], []
        for i in range(len(self.ds)):
            try:
                xs.append(self.transform(load_rgb(self.ds[i]["image"])))
                keep.append(i)
            except ImageDecodeError as e:
                failures.append((self.image_ids[i], str(e)))
        if not keep:
            raise DataError(f"none of the {len(self.ds)} images of {name} could be decoded")
        if failures:
            warn_skipped(failures, len(self.ds))
            self.image_ids = [self.image_ids[i] for i in keep]
            self.refs = [self.refs[i] for i in keep]
        return torch.stack(xs)

    def __len__(self) -> int:
        return len(self.index)

    def image_tensor(self, i: int) -> Tensor:
        """The i-th image, preprocessed: (3, S, S)."""
        if self.images is not None:
            return self.images[i]
        return self.transform(load_rgb(self.ds[i]["image"], target_size=self.target_size))

    def _input(self, i: int) -> dict[str, Tensor]:
        if self.features is not None:  # cached region features of a frozen encoder: (N, D)
            return {"feats": torch.from_numpy(np.asarray(self.features[i], dtype=np.float32))}
        return {"image": self.image_tensor(i)}

    def fingerprint(self) -> str:
        """Identifies the split's images (for the feature cache key)."""
        h = hashlib.sha1(json.dumps(self.image_ids).encode())
        h.update(str(getattr(self.ds, "_fingerprint", "")).encode())
        return h.hexdigest()[:16]

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, j = self.index[k]
        if self.train:
            return {**self._input(i), "caption": self.encoded[i][j]}
        return {
            **self._input(i),
            "caption": self.encoded[i][0],  # for the teacher-forced validation loss
            "image_id": self.image_ids[i],
            "refs": self.refs[i],
        }


def drop_empty_captions(refs: list[list[str]], name: str = "") -> tuple[list[list[str]], int, int]:
    """Drop captions with no word ("", " ", "."): trained on, they teach the model to stop at once.

    Returns the remaining captions per image, and how many captions and images (left with none)
    were dropped; both counts are logged once.
    """
    kept = [[c for c in caps if tokenize(c)] for caps in refs]
    captions = sum(len(a) - len(b) for a, b in zip(refs, kept, strict=True))
    images = sum(1 for a, b in zip(refs, kept, strict=True) if a and not b)
    if captions:
        log.warning(
            "%s: dropped %d empty caption(s); %d image(s) left without any are not used",
            name or "dataset",
            captions,
            images,
        )
    return kept, captions, images


def collate(samples: list[dict[str, Any]], pad_id: int = Vocab.pad_id) -> dict[str, Any]:
    """Stack images (or cached features), pad captions to the longest in the batch.

    Padding is masked in the loss, not sorted away.
    """
    batch: dict[str, Any] = {}
    if "feats" in samples[0]:
        batch["feats"] = torch.stack([s["feats"] for s in samples])  # (B, N, D)
    else:
        batch["images"] = torch.stack([s["image"] for s in samples])  # (B, 3, S, S)
    batch |= {
        "captions": pad_sequence(
            [s["caption"] for s in samples], batch_first=True, padding_value=pad_id
        ),  # (B, L)
    }
    if "image_id" in samples[0]:
        batch["image_ids"] = [s["image_id"] for s in samples]
        batch["refs"] = [s["refs"] for s in samples]
    return batch


class CaptionDataModule(L.LightningDataModule):
    """Loads a source's splits once, builds the vocabulary from train, serves the loaders."""

    def __init__(
        self,
        data: dict[str, Any],
        cache_dir: str,
        *,
        preprocess: Preprocess | None = None,
        seed: int = 0,
        vocab: Vocab | None = None,
        train_per_image: bool = False,
    ):
        super().__init__()
        self.cfg = dict(data)
        for key in ("name", "batch_size"):
            if key not in self.cfg:
                raise ConfigError(f"data config needs a {key!r} key")
        self.preprocess = preprocess
        self.cache_dir = str(Path(cache_dir).expanduser())
        self.seed = seed
        self.vocab = vocab
        self.splits: dict[str, Any] | None = None
        self.datasets: dict[str, CaptionDataset] = {}
        self.encoder: Encoder | None = None  # set by use_feature_cache
        # Train on images with all their references (self-critical), not (image, caption) pairs.
        self.train_per_image = train_per_image

    def use_feature_cache(self, encoder: Encoder) -> bool:
        """Train from cached features when the encoder is frozen (data.feature_cache: auto)."""
        mode = self.cfg.get("feature_cache", "auto")
        if mode not in ("auto", True, False):
            raise ConfigError(f"data.feature_cache must be auto, true or false; got {mode!r}")
        frozen = encoder.fine_tune == "none"
        if mode is True and not frozen:
            raise ConfigError(
                "data.feature_cache=true needs a frozen encoder (encoder.fine_tune=none)"
            )
        self.encoder = encoder if (mode is True or (mode == "auto" and frozen)) else None
        self.preprocess = encoder.preprocess
        return self.encoder is not None

    def _feature_dir(self, split: str) -> Path:
        key = cache_key(self.encoder, self.dataset(split).fingerprint())
        return cache_dir_for(self.cache_dir, key)

    def prepare_data(self) -> None:
        """On one process per machine: compute any missing cached features."""
        if self.encoder is None:
            return
        # On the device the run trains on: a GPU run caches its features on the GPU (the same
        # features to fp16 storage precision, under the same key: tests/test_gpu.py).
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        for split in self.splits or self.load().splits:
            compute_features(
                self.encoder,
                self.dataset(split),
                self._feature_dir(split),
                batch_size=int(self.cfg.get("eval_batch_size", 64)),
                num_workers=int(self.cfg.get("num_workers", 0)),
                device=device,
            )

    def load(self) -> "CaptionDataModule":
        """Build or load the splits and the vocabulary; safe to call more than once."""
        if self.splits is None:
            self.splits = load_splits(
                self.cfg["name"], cache_dir=self.cache_dir, **dict(self.cfg.get("args") or {})
            )
        if self.vocab is None:
            train_caps = [c for caps in self.splits["train"]["captions"] for c in caps]
            self.vocab = Vocab.build(
                train_caps,
                min_freq=int(self.cfg.get("min_word_freq", 1)),
                max_len=int(self.cfg.get("max_caption_len", 20)),
            )
        return self

    def info(self) -> dict[str, Any]:
        """What the checkpoint records about the data it was trained on."""
        self.load()
        return {
            "name": self.cfg["name"],
            "args": dict(self.cfg.get("args") or {}),
            "config": dict(self.cfg),
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "vocab_size": len(self.vocab),
        }

    def dataset(self, split: str, evaluation: bool = False) -> CaptionDataset:
        """A split's dataset: (image, caption) pairs for training, or one row per image with all
        its references when `evaluation` is set or the split is not "train"."""
        self.load()
        if split not in self.splits:
            raise ConfigError(f"unknown split {split!r}; valid choices: {', '.join(self.splits)}")
        if self.preprocess is None:
            raise RuntimeError("set the encoder's preprocessing before building datasets")
        train = split == "train" and not evaluation
        key = split if train or split != "train" else "train-eval"
        if key not in self.datasets:
            self.datasets[key] = CaptionDataset(
                self.splits[split],
                self.vocab,
                self.preprocess,
                train=train,
                preload=bool(self.cfg.get("preload", False)),
                name=f"{self.cfg['name']}/{split}",
            )
        return self.datasets[key]

    def setup(self, stage: str | None = None) -> None:
        self.load()
        if self.encoder is not None:
            for split in self.splits:
                ds = self.dataset(split)
                ds.features = load_features(self._feature_dir(split), ds.image_ids)
            if self.train_per_image:  # the same images in the same order: the same features
                self.dataset("train", evaluation=True).features = self.dataset("train").features

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        bs = int(self.cfg["batch_size"] if train else self.cfg.get("eval_batch_size", 100))
        g = torch.Generator()
        g.manual_seed(self.seed)
        per_image = train and self.train_per_image
        return DataLoader(
            self.dataset(split, evaluation=per_image),
            batch_size=bs,
            shuffle=train,
            num_workers=workers,
            collate_fn=collate,
            drop_last=False,
            generator=g if train else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_seed_worker,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)


def _seed_worker(worker_id: int) -> None:
    # SLURM's scancel and a terminal's Ctrl-C signal the whole process group: a worker killed
    # by it would crash the main process before it can save (captioning/reliability.py). The
    # main process handles the signal and shuts its workers down; a worker whose main process
    # died anyway exits on its own (PyTorch's worker loop watches its parent).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
