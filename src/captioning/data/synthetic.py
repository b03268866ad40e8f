"""The built-in synthetic source: coloured shapes on textured backgrounds, with 5 captions each.

Scenes hold one to three objects (shape, colour, size) laid out along one axis, left to right or
top to bottom, so every spatial relation a caption states is unambiguous. Reference 1 is always
the canonical caption ("a small red circle to the left of a large blue square"); references 2-5
are drawn from close variants of it, so a small model can learn one dominant phrasing while the
references still vary. Everything is deterministic in the arguments: each image has its own RNG
seeded by ``(seed, split index, image index)``, so splits do not depend on generation order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..errors import ConfigError
from ..fsutil import atomic_dir
from . import SOURCES, SPLITS

log = logging.getLogger(__name__)

# Bump whenever a change would alter any generated image or caption: it is part of the cache key.
GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle", "diamond", "cross")
# Saturated colours with hues far apart; backgrounds stay near-grey, so they never match these.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 220, 30),
    "green": (35, 165, 55),
    "blue": (40, 85, 230),
    "purple": (145, 50, 200),
}
# Side of the cell an object fills, as a fraction of the image side (10 px / 18 px at 64 px).
SIZES: dict[str, float] = {"small": 0.16, "large": 0.28}
MAX_OBJECTS = 3  # a fourth object would push the canonical caption past 20 words

_BORDER = 0.03  # min distance from an object to the image edge, fraction of the image side
_GAP = 0.04  # min gap between neighbouring objects' edges along the relation axis
_DOMINANCE = 1.5  # centre offset along the relation axis >= this x the offset across it
_SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: anti-aliased edges
_SQUARE_SCALE = 0.85  # a square filling its cell looks much bigger than the other shapes

# Relation phrases per axis: (first before second, long), (second after first, long), short.
_RELATIONS = {
    "x": ("to the left of", "to the right of", "left of"),
    "y": ("above", "below", "above"),
}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; `box` is (x0, y0, x1, y1) normalised to 0..1."""

    shape: str
    colour: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def phrase(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """A rendered image, its objects in caption order, the relation axis and the references."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject]
    axis: str  # "x" (left to right) or "y" (top to bottom)
    captions: list[str]


# ---------------------------------------------------------------- captions


def make_captions(objects: list[SceneObject], axis: str, rng: np.random.Generator) -> list[str]:
    """Five distinct references: the canonical caption first, then four of its variants."""
    full = [f"a {o.phrase}" for o in objects]
    short = [f"{_article(o.colour)} {o.colour} {o.shape}" for o in objects]  # size left out
    before, after, before_short = _RELATIONS[axis]
    if len(objects) == 1:
        (a,), (sa,) = full, short
        canonical = a
        variants = [
            f"{a} on a textured background",
            f"there is {a}",
            sa,
            f"there is {a} on a textured background",
            f"{sa} on a textured background",
        ]
    elif len(objects) == 2:
        (a, b), (sa, sb) = full, short
        canonical = f"{a} {before} {b}"
        variants = [
            f"{b} {after} {a}",
            f"{a} and {b}",
            f"there is {sa} {before_short} {sb}",
            f"{a} {before_short} {b}",
            f"{a} is {before} {b}",
            f"{sa} {before} {sb}",
            f"there is {a} {before} {b}",
        ]
    else:
        (a, b, c), (sa, sb, sc) = full, short
        # One chain, in axis order: the first object, then the other two in the same order.
        canonical = f"{a} {before} {b} and {c}"
        variants = [
            f"{c} {after} {b} and {a}",
            f"{a} next to {b} and {c}",
            f"there is {sa} {before_short} {sb} and {sc}",
            f"{a} {before_short} {b} {before_short} {c}",
            f"{a} is {before} {b} and {c}",
            f"{sa} {before} {sb} and {sc}",
            f"there is {a} {before} {b} and {c}",
        ]
    # Vertical scenes have one short relation word ("above"), so some variants repeat others.
    variants = [v for v in dict.fromkeys(variants) if v != canonical]
    picked = rng.choice(len(variants), size=4, replace=False)
    return [canonical] + [variants[i] for i in picked]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


# ---------------------------------------------------------------- layout


def _pick_objects(rng: np.random.Generator, n: int) -> list[tuple[str, str, str]]:
    """`n` distinct (shape, colour, size) triples, so no caption names the same object twice."""
    picked: list[tuple[str, str, str]] = []
    while len(picked) < n:
        obj = (
            SHAPES[rng.integers(len(SHAPES))],
            list(COLOURS)[rng.integers(len(COLOURS))],
            list(SIZES)[rng.integers(len(SIZES))],
        )
        if obj not in picked:
            picked.append(obj)
    return picked


def _layout(
    rng: np.random.Generator, cells: list[float], size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (along, across) for cells placed in order along an axis, with clear relations.

    Along the axis the free space is split at random among the gaps (so neighbours never overlap
    and keep at least `_GAP` between edges); across it, positions are rejection-sampled until every
    pair's along-axis offset dominates its across-axis offset by `_DOMINANCE`.
    """
    cells_a = np.asarray(cells)
    border, gap = _BORDER * size, _GAP * size
    slack = size - 2 * border - cells_a.sum() - gap * (len(cells) - 1)
    if slack < 0:
        raise ValueError("objects do not fit")  # callers redraw the sizes
    spaces = rng.dirichlet(np.ones(len(cells) + 1)) * slack
    starts = border + np.cumsum(spaces[:-1]) + np.concatenate([[0], np.cumsum(cells_a[:-1] + gap)])
    along = starts + cells_a / 2
    lo, hi = border + cells_a / 2, size - border - cells_a / 2
    for _ in range(100):
        across = rng.uniform(lo, hi)
        d_along = np.abs(along[:, None] - along[None, :])
        d_across = np.abs(across[:, None] - across[None, :])
        if np.all(d_along >= _DOMINANCE * d_across):
            return along, across
    raise ValueError("no layout with clear relations")


def _box_of(shape: str, cx: float, cy: float, cell: float) -> tuple[float, float, float, float]:
    """Tight pixel box of a shape drawn in a `cell`-sized square centred on (cx, cy)."""
    half = cell * (_SQUARE_SCALE if shape == "square" else 1.0) / 2
    return (cx - half, cy - half, cx + half, cy + half)


# ---------------------------------------------------------------- rendering


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted near-grey texture: tinted base, gradient, then noise, stripes or blotches."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(80, 175) + rng.uniform(-10, 10, size=3)  # grey with a faint tint
    angle = rng.uniform(0, 2 * np.pi)
    grad = rng.uniform(0, 30) * ((np.cos(angle) * xx + np.sin(angle) * yy) - 0.5)
    kind = rng.integers(3)
    if kind == 0:  # fine grain
        tex = rng.normal(0, rng.uniform(3, 8), size=(size, size))
    elif kind == 1:  # low-contrast stripes at a random angle and period
        theta, period = rng.uniform(0, np.pi), rng.uniform(0.06, 0.2)
        phase = (np.cos(theta) * xx + np.sin(theta) * yy) / period * 2 * np.pi
        tex = rng.uniform(4, 10) * np.sin(phase + rng.uniform(0, 2 * np.pi))
    else:  # soft blotches: coarse noise upsampled
        coarse = rng.normal(0, rng.uniform(6, 12), size=(size // 8, size // 8)).astype(np.float32)
        tex = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BILINEAR))
    tex = tex + rng.normal(0, 2, size=(size, size))  # a little grain on every background
    grey = (grad + tex)[..., None] + base  # (H, W, 3): texture shared by channels, stays grey
    return np.clip(grey + rng.normal(0, 1.5, size=(size, size, 3)), 0, 255)


def _paint(canvas: np.ndarray, shape: str, box: tuple[float, ...], rgb: tuple[int, ...]) -> None:
    """Blend a filled shape in `box` (pixels) onto `canvas` in place, anti-aliased by supersampling."""
    k = _SUPERSAMPLE
    h, w = canvas.shape[:2]
    # Only the window around the box is drawn: a whole-image mask per object costs 5x more.
    left, top = max(int(box[0]) - 1, 0), max(int(box[1]) - 1, 0)
    right, bottom = min(int(np.ceil(box[2])) + 1, w), min(int(np.ceil(box[3])) + 1, h)
    mask = Image.new("L", ((right - left) * k, (bottom - top) * k), 0)
    draw = ImageDraw.Draw(mask)
    x0, y0, x1, y1 = ((v - o) * k for v, o in zip(box, (left, top, left, top), strict=True))
    cx, cy, t = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 6
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "triangle":  # pointing up; its box centre lies inside it
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=255)
    elif shape == "cross":  # a plus sign with arms a third of the cell wide
        draw.rectangle([cx - t, y0, cx + t, y1], fill=255)
        draw.rectangle([x0, cy - t, x1, cy + t], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    alpha = np.asarray(mask.resize((right - left, bottom - top), Image.BOX), np.float32) / 255.0
    alpha = alpha[..., None]  # (h, w, 1)
    region = canvas[top:bottom, left:right]
    region *= 1 - alpha
    region += np.asarray(rgb, np.float32) * alpha


def make_scene(rng: np.random.Generator, image_size: int = 64, max_objects: int = 3) -> Scene:
    """Draw one random scene and its five references from `rng`."""
    n = int(rng.integers(1, max_objects + 1))
    while True:
        picked = _pick_objects(rng, n)
        cells = [SIZES[size] * image_size for _, _, size in picked]
        try:
            along, across = _layout(rng, cells, image_size)
            break
        except ValueError:  # e.g. three large objects in a tight row: redraw the objects
            continue
    axis = "x" if n == 1 or rng.random() < 0.5 else "y"
    canvas = _background(rng, image_size)
    objects = []
    for (shape, colour, size), a, c, cell in zip(picked, along, across, cells, strict=True):
        cx, cy = (a, c) if axis == "x" else (c, a)
        box = _box_of(shape, cx, cy, cell)
        _paint(canvas, shape, box, COLOURS[colour])
        norm = tuple(float(np.clip(v / image_size, 0.0, 1.0)) for v in box)
        objects.append(SceneObject(shape, colour, size, norm))
    image = np.rint(canvas).astype(np.uint8)
    return Scene(image, objects, axis, make_captions(objects, axis, rng))


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Noisy backgrounds barely compress: the fastest level saves ~20% time for ~10% more bytes.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


# ---------------------------------------------------------------- datasets


def features() -> datasets.Features:
    """The row schema of this source (see `captioning.data`)."""
    seq = getattr(datasets, "List", datasets.Sequence)  # `List` replaced `Sequence` in datasets 4
    return datasets.Features(
        {
            "image_id": datasets.Value("string"),
            "image": datasets.Image(decode=False),
            "captions": seq(datasets.Value("string")),
            "boxes": seq(seq(datasets.Value("float32"), length=4)),
            "objects": seq(datasets.Value("string")),
        }
    )


def generate_split(
    split: str, num: int, seed: int = 0, image_size: int = 64, max_objects: int = 3
) -> datasets.Dataset:
    """Generate one split in memory; image i depends only on (seed, split, i)."""
    split_index = SPLITS.index(split)
    rows: dict[str, list] = {k: [] for k in ("image_id", "image", "captions", "boxes", "objects")}
    for i in range(num):
        scene = make_scene(np.random.default_rng([seed, split_index, i]), image_size, max_objects)
        rows["image_id"].append(f"synthetic-{split}-{i:06d}")
        rows["image"].append({"bytes": _png(scene.image), "path": None})
        rows["captions"].append(scene.captions)
        rows["boxes"].append([list(o.box) for o in scene.objects])
        rows["objects"].append([o.phrase for o in scene.objects])
    return datasets.Dataset.from_dict(rows, features=features())


def cache_path(cache_dir: str | os.PathLike, **args: int) -> Path:
    """Folder holding the splits built from `args`; the generator version is part of its name."""
    key = json.dumps({"version": GENERATOR_VERSION, **args}, sort_keys=True)
    return Path(cache_dir).expanduser() / f"synthetic-{hashlib.sha1(key.encode()).hexdigest()[:12]}"


@SOURCES.register("synthetic")
def build_synthetic(
    cache_dir: str,
    seed: int = 0,
    num_train: int = 4000,
    num_val: int = 500,
    num_test: int = 500,
    image_size: int = 64,
    max_objects: int = 3,
) -> dict[str, datasets.Dataset]:
    """Load the synthetic splits from `cache_dir`, generating them on first use."""
    counts = {"train": num_train, "val": num_val, "test": num_test}
    if any(n < 0 for n in counts.values()):
        raise ConfigError(f"synthetic split sizes must be >= 0, got {counts}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ConfigError(f"synthetic max_objects must be in 1..{MAX_OBJECTS}, got {max_objects}")
    if image_size < 32:
        raise ConfigError(f"synthetic image_size must be >= 32, got {image_size}")
    args = dict(
        seed=seed,
        num_train=num_train,
        num_val=num_val,
        num_test=num_test,
        image_size=image_size,
        max_objects=max_objects,
    )
    path = cache_path(cache_dir, **args)
    if not path.exists():
        _generate_to(path, counts, seed, image_size, max_objects)
    dd = datasets.load_from_disk(str(path))
    return {split: dd[split] for split in SPLITS}


def _generate_to(
    path: Path, counts: dict[str, int], seed: int, image_size: int, max_objects: int
) -> None:
    start = time.perf_counter()
    log.info("generating the synthetic dataset into %s", path)
    # A reader sees all of it or nothing; of two processes generating at once, one copy stays.
    with atomic_dir(path) as tmp:
        dd = datasets.DatasetDict(
            {s: generate_split(s, counts[s], seed, image_size, max_objects) for s in SPLITS}
        )
        dd.save_to_disk(str(tmp))
    log.info("generated %d images in %.1f s", sum(counts.values()), time.perf_counter() - start)


def preview(ds: datasets.Dataset, path: str | os.PathLike, n: int = 16, scale: int = 3) -> None:
    """Write a PNG grid of the first `n` images, each upscaled, with its first two references."""
    n = min(n, len(ds))
    if n == 0:
        raise ValueError("nothing to preview: the dataset is empty")
    font = ImageFont.load_default()
    cols = min(4, n)
    tiles = []
    for row in ds.select(range(n)):
        img = Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB")
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
        lines = [ln for c in row["captions"][:2] for ln in textwrap.wrap(c, 34)]
        tile = Image.new("RGB", (max(img.width, 210), img.height + 12 * len(lines) + 6), "white")
        tile.paste(img, (0, 0))
        draw = ImageDraw.Draw(tile)
        for j, line in enumerate(lines):
            draw.text((2, img.height + 2 + 12 * j), line, fill="black", font=font)
        tiles.append(tile)
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    grid = Image.new("RGB", (cols * w, -(-n // cols) * h), "white")
    for j, tile in enumerate(tiles):
        grid.paste(tile, ((j % cols) * w, (j // cols) * h))
    grid.save(path)
