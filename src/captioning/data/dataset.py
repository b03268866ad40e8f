"""A split's rows as tensors (`CaptionDataset`) and the padded batches they make (`collate`).

Pure PyTorch, no Lightning: the DataModule serves them for training, evaluation uses them alone.
"""

import hashlib
import json
import logging
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

from ..encoders import Preprocess
from ..errors import DataError
from ..transforms import make_transform
from ..vocab import Vocab, tokenize
from .images import ImageDecodeError, load_rgb, warn_skipped

log = logging.getLogger(__name__)


class CaptionDataset(Dataset):
    """Rows of a `datasets.Dataset` as tensors.

    Training yields one sample per (image, caption) pair; evaluation one per image with all its
    references. Images that fail to decode are dropped up front (counted, one warning), so a
    DataLoader worker never meets them.

    A training sample can also be read flipped, `ds[(k, True)]` (`FlipSampler`, `data.flip`):
    the image mirrored left to right (its cached "hflip" features, `flipped_features`, or the
    image tensor flipped on its width axis), "left" and "right" swapped in its caption.
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
        self.flipped_features: np.ndarray | None = None  # the same of the mirrored images
        # JPEG draft mode decodes big photos at a reduced scale, no smaller than needed.
        self.target_size = preprocess.resize_size
        if preload:  # small datasets: decode once, keep (M, 3, S, S) in memory
            self.images = self._preload(name)
        self.refs, self.dropped_captions, self.dropped_images = drop_empty_captions(self.refs, name)
        encoded = [[torch.tensor(vocab.encode(c)) for c in refs] for refs in self.refs]
        self.encoded = encoded
        self.flip_words, self.unflippable = flip_words(vocab)
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

    def _input(self, i: int, flipped: bool = False) -> dict[str, Tensor]:
        if self.features is not None:  # cached region features of a frozen encoder: (N, D)
            feats = self.flipped_features if flipped else self.features
            if feats is None:
                raise RuntimeError("the flipped images' features are not loaded (data.flip)")
            return {"feats": torch.from_numpy(np.asarray(feats[i], dtype=np.float32))}
        image = self.image_tensor(i)
        return {"image": image.flip(-1) if flipped else image}  # (3, S, S)

    def fingerprint(self) -> str:
        """Identifies the split's images (for the feature cache key)."""
        h = hashlib.sha1(json.dumps(self.image_ids).encode())
        h.update(str(getattr(self.ds, "_fingerprint", "")).encode())
        return h.hexdigest()[:16]

    def __getitem__(self, k: int | tuple[int, bool]) -> dict[str, Any]:
        k, flipped = k if isinstance(k, tuple) else (k, False)
        i, j = self.index[k]
        if self.train:
            caption = self.encoded[i][j]
            # A caption that names the one word of the pair in the vocabulary cannot be mirrored
            # (its partner would read <unk>): that sample stays as it is.
            flipped = flipped and not bool((caption == self.unflippable).any())
            if flipped:
                caption = self.flip_words[caption]
            return {**self._input(i, flipped), "caption": caption}
        if flipped:
            raise ValueError("only training samples have a flipped view")
        return {
            **self._input(i),
            "caption": self.encoded[i][0],  # for the teacher-forced validation loss
            "image_id": self.image_ids[i],
            "refs": self.refs[i],
        }


FLIP_WORDS = ("left", "right")  # what a mirror swaps in a caption


def flip_words(vocab: Vocab) -> tuple[Tensor, int]:
    """Token ids of a caption -> those of its mirror image: "left" and "right" swapped, (V,).

    Also the id of a word that cannot be swapped (the one of the pair in the vocabulary when its
    partner is not), or -1 (no token id) when there is none.
    """
    table = torch.arange(len(vocab))
    left, right = (vocab.stoi.get(w) for w in FLIP_WORDS)
    if left is None or right is None:
        lone = left if right is None else right
        return table, -1 if lone is None else lone
    table[left], table[right] = right, left
    return table, -1


class FlipSampler(Sampler[tuple[int, bool]]):
    """The training samples in a random order, each flipped with probability `p`: (k, flipped).

    The order and the flips are drawn from one generator, the DataLoader's, at the start of each
    epoch: `training/resume.py` saves and restores that generator, and at a mid-epoch resume
    skips the pairs already trained as it skips indices, so a resumed run sees the same views.
    """

    def __init__(self, n: int, generator: torch.Generator, p: float = 0.5):
        self.n, self.generator, self.p = n, generator, p

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.generator)  # (n,)
        flipped = torch.rand(self.n, generator=self.generator) < self.p  # (n,)
        yield from zip(order.tolist(), flipped.tolist(), strict=True)


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


class Batch(NamedTuple):
    """A batch of `collate`: cached features or images, padded captions, and, from evaluation
    datasets (and the self-critical stage), the image ids with their references.

    A NamedTuple, so the DataLoader pins it and Lightning moves it to the device as it is.
    """

    captions: Tensor  # (B, L): <start> w1 .. wn <end> <pad>..
    feats: Tensor | None = None  # (B, N, D) cached region features
    images: Tensor | None = None  # (B, 3, S, S) when there are no cached features
    image_ids: list[str] | None = None
    refs: list[list[str]] | None = None


def collate(samples: list[dict[str, Any]], pad_id: int = Vocab.pad_id) -> Batch:
    """Stack images (or cached features), pad captions to the longest in the batch.

    Padding is masked in the loss, not sorted away.
    """
    cached = "feats" in samples[0]
    labelled = "image_id" in samples[0]
    return Batch(
        captions=pad_sequence(
            [s["caption"] for s in samples], batch_first=True, padding_value=pad_id
        ),  # (B, L)
        feats=torch.stack([s["feats"] for s in samples]) if cached else None,  # (B, N, D)
        images=None if cached else torch.stack([s["image"] for s in samples]),  # (B, 3, S, S)
        image_ids=[s["image_id"] for s in samples] if labelled else None,
        refs=[s["refs"] for s in samples] if labelled else None,
    )
