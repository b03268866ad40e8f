"""Robust image decoding: anything a user or a dataset hands us becomes an 8-bit RGB image or a
short `ImageDecodeError`, never a crash, a hang or a silently wrong picture.

Bad images are found once, when a source is converted (`check_images`), and dropped from the
saved splits; so DataLoader workers never meet them and no skip counts have to travel back from
worker processes. `DecodeStats` / `warn_skipped` cover the in-process loops (evaluation, the web
app) that decode images the conversion never saw.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..errors import DataError

# Pillow's own default (Image.MAX_IMAGE_PIXELS): about a 9459 x 9459 image, ~268 MB as RGB.
DEFAULT_MAX_PIXELS = 89_478_485
# Failures named in a warning; the rest are only counted.
MAX_NAMED = 5

ImageInput = dict | str | os.PathLike | bytes | bytearray | Image.Image

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
_WHITE = (255, 255, 255)


class ImageDecodeError(DataError):
    """An image that cannot be decoded; `reason` is short enough to list several in one line."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"cannot decode {source}: {reason}")
        self.source = source
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return type(self), (self.source, self.reason)  # picklable across worker processes


class SkippedImagesWarning(UserWarning):
    """Some images of a dataset could not be decoded and were left out."""


def load_rgb(
    image: ImageInput,
    target_size: int | tuple[int, int] | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode `image` to an upright 8-bit RGB image, or raise `ImageDecodeError`.

    `image` is a ``datasets.Image(decode=False)`` dict (``bytes`` wins over ``path``), a path, raw
    bytes or a PIL image. `target_size` (shorter side, or (width, height) as displayed) is only a
    hint: JPEGs are decoded at the smallest 1/2, 1/4 or 1/8 scale still at least that big, which
    makes big photos several times faster; the caller still resizes. `max_pixels` caps the size a
    file may declare (decompression bombs); None leaves only Pillow's own hard cap.
    """
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened image may still turn out truncated here
            return _to_rgb(_upright(image), "<PIL image>")
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError("<PIL image>", _short(e)) from None
    fp, name = _open_input(image)
    try:
        with warnings.catch_warnings():
            # Our own `max_pixels` check below decides; Pillow's warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as e:  # over twice Pillow's own global limit
        n = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(n.group(1)):,} pixels" if n else "too many pixels"
        raise ImageDecodeError(name, f"declares {size} (a decompression bomb?)") from None
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(name, _sniff(fp)) from None
    except Exception as e:  # Pillow plugins raise many types on garbage headers
        raise ImageDecodeError(name, _short(e)) from None
    with im:
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageDecodeError(name, f"invalid size {w}x{h}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageDecodeError(
                name, f"{w}x{h} = {w * h:,} pixels is over the limit of {max_pixels:,}"
            )
        try:
            if target_size is not None and im.format == "JPEG":
                im.draft("RGB", _draft_request(im, target_size))
            im.load()  # first frame only for animations: we never seek
            return _to_rgb(_upright(im), name)
        except ImageDecodeError:
            raise
        except Exception as e:
            raise ImageDecodeError(name, _short(e)) from None


def _open_input(image: Any) -> tuple[Any, str]:
    """Return (file object or path, display name) for an input, rejecting empty/missing ones."""
    if isinstance(image, dict):
        data, path = image.get("bytes"), image.get("path")
        if data is not None:
            name = Path(path).name if path else "<bytes>"
            return _open_input_bytes(data, name)
        if path is None:
            raise ImageDecodeError("<image>", "neither bytes nor a path")
        image = path
    if isinstance(image, bytes | bytearray | memoryview):
        return _open_input_bytes(bytes(image), "<bytes>")
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        name = str(path)
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageDecodeError(name, "file not found") from None
        except OSError as e:
            raise ImageDecodeError(name, _short(e)) from None
        if path.is_dir():
            raise ImageDecodeError(name, "is a directory")
        if size == 0:
            raise ImageDecodeError(name, "empty file")
        return path, name
    raise ImageDecodeError("<image>", f"unsupported input type {type(image).__name__}")


def _open_input_bytes(data: bytes, name: str) -> tuple[io.BytesIO, str]:
    if not data:
        raise ImageDecodeError(name, "empty data")
    return io.BytesIO(data), name


def _draft_request(im: Image.Image, target_size: int | tuple[int, int]) -> tuple[int, int]:
    """The stored-orientation size to ask `draft` for, so the displayed image covers the target."""
    w, h = im.size
    rotated = im.getexif().get(_ORIENTATION) in (5, 6, 7, 8)
    if isinstance(target_size, int):
        scale = target_size / min(w, h)  # symmetric in w and h, so rotation does not matter
        return max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))
    tw, th = target_size
    return (th, tw) if rotated else (tw, th)


def _upright(im: Image.Image) -> Image.Image:
    """A new, upright image (also detached from the file, so the file can close)."""
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # a malformed EXIF block should not cost us an otherwise good image
        return im.copy()


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    """Convert any Pillow mode to RGB; transparency is composited on white, high depths scaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    try:
        if has_alpha:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, _WHITE + (255,))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return im.convert("RGB")
    except Exception as e:  # e.g. LAB, HSV or a mode Pillow cannot convert directly
        raise ImageDecodeError(name, f"cannot convert mode {mode} to RGB ({_short(e)})") from None


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """Map a 16/32-bit integer or float single-channel array to 0..255."""
    is_float = a.dtype.kind == "f"
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = float(a.min()), float(a.max())
    if is_float and lo >= 0.0 and hi <= 1.0:
        a = a * 255.0  # float images in 0..1
    elif hi > 255.0 and lo >= 0.0 and hi <= 65535.0:
        a = a / 257.0  # 16-bit range: 65535 -> 255 exactly
    elif lo < 0.0 or hi > 255.0:
        a = (a - lo) * (255.0 / max(hi - lo, 1e-12))  # unknown range: stretch it
    return np.clip(np.rint(a), 0, 255).astype(np.uint8)


def _sniff(fp: Any) -> str:
    """Name what a non-image file is, when it is a usual suspect (a failed download, say)."""
    try:
        if isinstance(fp, io.BytesIO):
            head = fp.getvalue()[:512]
        else:
            with open(fp, "rb") as f:
                head = f.read(512)
    except OSError:
        head = b""
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"%PDF"):
        return "a PDF document, not an image"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "a ZIP archive, not an image"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data, not an image"
    if b"<svg" in text:
        return "an SVG (vector) image; only raster images are supported"
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text:
        return "an HTML page, not an image (a failed download?)"
    if text.startswith(b"<?xml") or text.startswith(b"<"):
        return "an XML/markup document, not an image"
    return "not a recognised image format"


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    if "truncated" in msg.lower() or isinstance(e, EOFError):
        return "truncated image data"
    return msg[:120]


# ---------------------------------------------------------------- counting failures


def warn_skipped(failures: Sequence[tuple[str, str]], total: int, what: str = "images") -> None:
    """Warn once about skipped images, naming the first few; raise if nothing decoded at all."""
    if not failures:
        return
    named = "; ".join(f"{name} ({reason})" for name, reason in failures[:MAX_NAMED])
    more = f"; and {len(failures) - MAX_NAMED} more" if len(failures) > MAX_NAMED else ""
    if len(failures) >= total:
        raise DataError(
            f"none of the {total} {what} could be decoded: {named}{more}. "
            "Check that the image folder holds the images the annotations name."
        )
    warnings.warn(
        f"skipped {len(failures)} of {total} {what} that could not be decoded: {named}{more}",
        SkippedImagesWarning,
        stacklevel=2,
    )


@dataclass
class DecodeStats:
    """Counts decodes in one process and reports the failures once (see `warn_skipped`)."""

    total: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def load(self, image: ImageInput, name: str | None = None, **kwargs: Any) -> Image.Image | None:
        """`load_rgb`, but a failure is recorded and returns None instead of raising."""
        self.total += 1
        try:
            return load_rgb(image, **kwargs)
        except ImageDecodeError as e:
            self.failures.append((name or e.source, e.reason))
            return None

    def report(self, what: str = "images") -> None:
        warn_skipped(self.failures, self.total, what)


# ---------------------------------------------------------------- checking a dataset once


def _check_batch(images: list[dict], max_pixels: int | None) -> dict[str, list[str]]:
    reasons = []
    for image in images:
        try:
            # A full decode (truncation only shows there), but JPEGs at 1/8 scale: ~10x cheaper.
            load_rgb(image, target_size=1, max_pixels=max_pixels)
            reasons.append("")
        except ImageDecodeError as e:
            reasons.append(e.reason)
    return {"decode_error": reasons}


def check_images(
    ds: Any,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    num_proc: int | None = None,
    name_column: str = "image_id",
) -> tuple[list[int], list[tuple[str, str]]]:
    """Decode every image of a `datasets.Dataset` once: (indices that decode, (name, reason)s).

    The image column must be ``Image(decode=False)``. Failures are named by file name when the
    image has a path, else by `name_column`. `num_proc` > 1 spreads the work over processes.
    """
    if len(ds) == 0:
        return [], []
    if num_proc is not None and num_proc > 1:
        num_proc = min(num_proc, max(1, len(ds) // 256))  # a process per few images is a loss
    result = ds.select_columns(["image"]).map(
        _check_batch,
        input_columns=["image"],
        batched=True,
        batch_size=64,
        remove_columns=["image"],
        fn_kwargs={"max_pixels": max_pixels},
        num_proc=num_proc if num_proc and num_proc > 1 else None,
        desc="checking images",
    )
    reasons = result["decode_error"]
    good = [i for i, r in enumerate(reasons) if not r]
    bad = [i for i, r in enumerate(reasons) if r]
    failures: list[tuple[str, str]] = []
    if bad:
        rows = ds.select(bad)
        names = rows[name_column] if name_column in ds.column_names else [str(i) for i in bad]
        for image, name, i in zip(rows["image"], names, bad, strict=True):
            path = image.get("path") if isinstance(image, dict) else None
            failures.append((Path(path).name if path else name, reasons[i]))
    return good, failures
