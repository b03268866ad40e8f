"""LightningDataModule: any registered source -> vocabulary from train -> padded batches."""

import logging
import random
import signal
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ..data import load_splits
from ..data.dataset import FLIP_WORDS, CaptionDataset, FlipSampler, collate
from ..encoders import Encoder, Preprocess
from ..errors import ConfigError
from ..features import Mirrored, cache_dir_for, cache_key, compute_features, load_features
from ..vocab import Vocab

log = logging.getLogger(__name__)


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
        # data.flip: each training sample is shown mirrored with probability 0.5 (FlipSampler).
        self.flip = self.cfg.get("flip", False)
        if self.flip not in (True, False):
            raise ConfigError(f"data.flip must be true or false; got {self.flip!r}")
        if self.flip and train_per_image:
            # Its rewards score captions against the plain images' references.
            raise ConfigError("data.flip=true is for cross-entropy training, not scst")

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

    def _feature_dir(self, split: str, view: str = "plain") -> Path:
        key = cache_key(self.encoder, self.dataset(split).fingerprint(), view)
        return cache_dir_for(self.cache_dir, key)

    def prepare_data(self) -> None:
        """On one process per machine: compute any missing cached features."""
        if self.encoder is None:
            return
        # On the device the run trains on: a GPU run caches its features on the GPU (the same
        # features to fp16 storage precision, under the same key: tests/test_gpu.py).
        strategy = getattr(self.trainer, "strategy", None) if self.trainer is not None else None
        device = strategy.root_device if strategy is not None else torch.device("cpu")
        views = [(split, "plain") for split in self.splits or self.load().splits]
        if self.flip:  # one more pass over the training images, mirrored
            views.append(("train", "hflip"))
        for split, view in views:
            ds = self.dataset(split)
            compute_features(
                self.encoder,
                Mirrored(ds) if view == "hflip" else ds,
                self._feature_dir(split, view),
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
            if self.flip:
                train = self.dataset("train")
                train.flipped_features = load_features(
                    self._feature_dir("train", "hflip"), train.image_ids
                )
            if self.train_per_image:  # the same images in the same order: the same features
                self.dataset("train", evaluation=True).features = self.dataset("train").features

    def _loader(self, split: str, train: bool) -> DataLoader:
        workers = int(self.cfg.get("num_workers", 0))
        bs = int(self.cfg["batch_size"] if train else self.cfg.get("eval_batch_size", 100))
        g = torch.Generator()
        g.manual_seed(self.seed)
        per_image = train and self.train_per_image
        ds = self.dataset(split, evaluation=per_image)
        # Flipped or not, drawn from the generator that shuffles: resume.py restores both.
        flips = FlipSampler(len(ds), g) if train and self.flip else None
        if flips is not None and ds.unflippable >= 0:
            _say_unflippable(ds)
        return DataLoader(
            ds,
            batch_size=bs,
            shuffle=train and flips is None,
            sampler=flips,
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


def _say_unflippable(ds: CaptionDataset) -> None:
    word = ds.vocab.itos[ds.unflippable]
    other = next(w for w in FLIP_WORDS if w != word)
    n = sum(bool((c == ds.unflippable).any()) for caps in ds.encoded for c in caps)
    log.warning(
        "data.flip: %r is in the vocabulary but %r is not, so the %d training caption(s) "
        "with %r are never flipped",
        word, other, n, word,
    )  # fmt: skip


def _seed_worker(worker_id: int) -> None:
    # SLURM's scancel and a terminal's Ctrl-C signal the whole process group: a worker killed
    # by it would crash the main process before it can save (captioning/training/guards.py). The
    # main process handles the signal and shuts its workers down; a worker whose main process
    # died anyway exits on its own (PyTorch's worker loop watches its parent).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
