"""Attention overlays: one smoothed, upsampled heat map per generated word (the paper's figures)."""

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from torch import Tensor

from .encoders import Preprocess
from .transforms import model_view


def square_grid(n_regions: int) -> int | None:
    """Side of the square grid that `n_regions` attention weights form, or None."""
    side = int(round(n_regions**0.5))
    return side if n_regions and side * side == n_regions else None


def heat_colours(alpha: np.ndarray) -> np.ndarray:
    """(h, w) attention in [0, 1] -> (h, w, 3) uint8 colours (black-red-yellow-white ramp)."""
    a = np.clip(alpha, 0.0, 1.0)
    r = np.clip(3 * a, 0, 1)
    g = np.clip(3 * a - 1, 0, 1)
    b = np.clip(3 * a - 2, 0, 1)
    return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def overlay(
    image: Image.Image,
    alpha: Tensor | np.ndarray,
    grid: int,
    strength: float = 0.6,
    blur: float | None = None,
) -> Image.Image:
    """Blend one word's attention (N = grid*grid weights) over the image, upsampled and smoothed."""
    a = np.asarray(alpha, dtype=np.float32).reshape(grid, grid)
    a = a / max(float(a.max()), 1e-8)  # each word's map uses the full colour range
    w, h = image.size
    small = Image.fromarray((a * 255).astype(np.uint8), mode="L")
    up = small.resize((w, h), Image.Resampling.BICUBIC)
    up = up.filter(ImageFilter.GaussianBlur(blur if blur is not None else max(w, h) / grid / 3))
    heat = Image.fromarray(heat_colours(np.asarray(up, dtype=np.float32) / 255.0))
    mask = up.point(lambda v: int(v * strength))  # transparent where attention is low
    base = image.convert("RGB")
    return Image.composite(heat, base, mask)


def attention_figure(
    image: Image.Image,
    words: list[str],
    alphas: Tensor | np.ndarray | None,
    grid: int | None,
    cols: int = 5,
    tile: int = 160,
) -> Image.Image:
    """The image, then one overlay per word, each labelled, in a grid of tiles."""
    base = image.convert("RGB").resize((tile, tile), Image.Resampling.BICUBIC)
    tiles = [(base, "<image>")]
    if alphas is not None and grid:
        for i, word in enumerate(words):
            tiles.append((overlay(base, alphas[i], grid), word))
    rows = (len(tiles) + cols - 1) // cols
    label_h = 18
    fig = Image.new("RGB", (cols * tile, rows * (tile + label_h)), "white")
    draw = ImageDraw.Draw(fig)
    for k, (im, label) in enumerate(tiles):
        x, y = (k % cols) * tile, (k // cols) * (tile + label_h)
        fig.paste(im, (x, y + label_h))
        draw.text((x + 4, y + 3), label, fill="black")
    return fig


def caption_figure(
    image: Image.Image,
    tokens: Sequence[int],
    alphas: Tensor | np.ndarray | None,
    itos: Sequence[str],
    preprocess: Preprocess,
    tile: int = 160,
) -> Image.Image:
    """The attention figure of a generated caption (CLI, evaluation report, W&B table): the part
    of the original `image` the model saw (what its attention refers to), then each word's map."""
    words = [itos[t] for t in tokens]
    grid = square_grid(alphas.shape[-1]) if alphas is not None else None
    return attention_figure(model_view(image, preprocess), words, alphas, grid, tile=tile)
