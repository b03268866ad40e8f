"""Robust decoding: every odd image becomes upright 8-bit RGB, every bad one a short error."""

from __future__ import annotations

import io
import pickle
import struct
import time
import zlib
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from captioning.data.images import (
    DecodeStats,
    ImageDecodeError,
    SkippedImagesWarning,
    check_images,
    load_rgb,
    warn_skipped,
)
from captioning.errors import DataError

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)


def encode(im: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def close(a: tuple[int, ...], b: tuple[int, ...], tol: int = 12) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write (48-bit RGB, absurd headers)."""
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows))
        + png_chunk(b"IEND", b"")
    )


def two_halves(size: tuple[int, int] = (40, 20)) -> Image.Image:
    """Left half red, right half blue (as stored)."""
    im = Image.new("RGB", size, RED)
    im.paste(BLUE, (size[0] // 2, 0, size[0], size[1]))
    return im


def with_orientation(im: Image.Image, orientation: int, quality: int = 95) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(im, "JPEG", exif=exif.tobytes(), quality=quality)


# ---------------------------------------------------------------- inputs


def test_inputs_dict_path_bytes_pil(tmp_path: Path) -> None:
    data = encode(Image.new("RGB", (8, 6), RED), "PNG")
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for given in (
        {"bytes": data, "path": None},
        {"bytes": None, "path": str(path)},
        {"bytes": data, "path": "not/there.png"},  # bytes win over the path
        str(path),
        path,
        data,
        Image.open(io.BytesIO(data)),
    ):
        im = load_rgb(given)
        assert im.mode == "RGB" and im.size == (8, 6) and im.getpixel((0, 0)) == RED


def test_file_is_closed_after_loading(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (4, 4), c) for c in (RED, BLUE)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    im = load_rgb(path)
    assert getattr(im, "fp", None) is None  # detached: no open handle kept per image


# ---------------------------------------------------------------- odd but valid images


def test_exif_orientation_applied() -> None:
    # Orientation 6: the stored image is shown rotated 90 degrees clockwise, so the stored
    # left (red) half becomes the displayed top half.
    im = load_rgb(with_orientation(two_halves((40, 20)), 6))
    assert im.size == (20, 40)
    assert close(im.getpixel((10, 5)), RED) and close(im.getpixel((10, 35)), BLUE)
    im = load_rgb(with_orientation(two_halves((40, 20)), 3))  # 180 degrees: blue on the left
    assert im.size == (40, 20)
    assert close(im.getpixel((5, 10)), BLUE) and close(im.getpixel((35, 10)), RED)


def test_draft_respects_rotation() -> None:
    # Stored 800x400, displayed 400x800; asking for 100x200 (displayed) decodes at 1/4 scale.
    big = two_halves((800, 400))
    im = load_rgb(with_orientation(big, 6), target_size=(100, 200))
    assert im.size == (100, 200)
    assert close(im.getpixel((50, 20)), RED) and close(im.getpixel((50, 180)), BLUE)
    assert load_rgb(with_orientation(big, 6), target_size=50).size == (50, 100)  # 1/8
    assert load_rgb(with_orientation(big, 1), target_size=120).size == (400, 200)  # >= 120


def test_draft_makes_big_jpegs_fast() -> None:
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (3000, 4000, 3), dtype=np.uint8))
    data = encode(noise, "JPEG", quality=90)
    start = time.perf_counter()
    full = load_rgb(data)
    t_full = time.perf_counter() - start
    start = time.perf_counter()
    small = load_rgb(data, target_size=256)
    t_draft = time.perf_counter() - start
    assert full.size == (4000, 3000) and small.size == (500, 375)  # 1/8 scale, still >= 256
    assert t_draft < t_full


def test_grayscale_and_bilevel() -> None:
    for mode, value in (("L", 77), ("1", 1)):
        im = load_rgb(encode(Image.new(mode, (5, 5), value), "PNG"))
        assert im.mode == "RGB"
        assert im.getpixel((2, 2)) == ((77, 77, 77) if mode == "L" else WHITE)
    im = load_rgb(encode(Image.new("L", (16, 16), 200), "JPEG"))
    assert close(im.getpixel((8, 8)), (200, 200, 200), 2)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    im = load_rgb(data)
    assert im.mode == "RGB" and close(im.getpixel((8, 8)), RED, 20)


def test_rgba_composited_on_white() -> None:
    im = Image.new("RGBA", (4, 1), (0, 0, 0, 0))
    im.putpixel((1, 0), (255, 0, 0, 255))
    im.putpixel((2, 0), (255, 0, 0, 128))
    out = load_rgb(encode(im, "PNG"))
    assert out.getpixel((0, 0)) == WHITE  # fully transparent black shows as white, not black
    assert out.getpixel((1, 0)) == RED
    assert close(out.getpixel((2, 0)), (255, 127, 127), 2)
    la = Image.new("LA", (2, 2), (0, 0))
    assert load_rgb(encode(la, "PNG")).getpixel((0, 0)) == WHITE


def test_palette_with_transparency() -> None:
    im = Image.new("P", (4, 4), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    im.putpixel((1, 1), 1)
    data = encode(im, "PNG", transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = load_rgb(data)
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 1)) == RED
    plain = Image.new("P", (2, 2), 1)
    plain.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    assert load_rgb(encode(plain, "PNG")).getpixel((0, 0)) == BLUE


def test_16bit_grayscale_png_scaled_not_clipped() -> None:
    a = np.array([[0, 32896, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(a), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    im = load_rgb(data)
    assert [im.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_16bit_rgb_png() -> None:
    # 48-bit RGB, one pixel (65535, 0, 32896); filter byte 0 starts the row.
    rows = b"\x00" + struct.pack(">HHH", 65535, 0, 32896)
    im = load_rgb(raw_png(1, 1, 16, 2, rows))
    assert im.getpixel((0, 0)) == (255, 0, 128)


def test_float_and_int32_modes() -> None:
    f = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert [load_rgb(f).getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]
    i = Image.fromarray(np.array([[0, 100, 255]], dtype=np.int32))
    assert [load_rgb(i).getpixel((x, 0))[0] for x in range(3)] == [0, 100, 255]


def test_animated_gif_first_frame() -> None:
    frames = [Image.new("RGB", (6, 6), c) for c in (RED, BLUE, WHITE)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(io.BytesIO(buf.getvalue())).n_frames == 3
    assert load_rgb(buf.getvalue()).getpixel((3, 3)) == RED


@pytest.mark.parametrize("size", [(1, 1), (10000, 1), (1, 3000)])
def test_extreme_shapes(size: tuple[int, int]) -> None:
    im = load_rgb(encode(Image.new("RGB", size, BLUE), "PNG"), target_size=224)
    assert im.size == size and im.getpixel((0, 0)) == BLUE


# ---------------------------------------------------------------- bad data


def _jpeg_noise() -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "data, reason",
    [
        (_jpeg_noise()[: len(_jpeg_noise()) // 2], "truncated"),
        (b"", "empty"),
        (np.random.default_rng(2).bytes(2048), "not a recognised image"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", "PDF"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00" + b"\x00" * 40, "ZIP"),
        (b"<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>", "HTML"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, None),  # a JPEG header and nothing else
    ],
    ids=["truncated-jpeg", "empty", "random", "pdf", "zip", "html", "svg", "header-only-jpeg"],
)
def test_bad_data_raises_short_error(data: bytes, reason: str | None) -> None:
    with pytest.raises(ImageDecodeError, match=reason) as err:
        load_rgb(data)
    assert isinstance(err.value, DataError)
    assert len(err.value.reason) <= 120 and "\n" not in str(err.value)


def test_decompression_bomb_rejected_fast() -> None:
    bomb = raw_png(100_000, 100_000, 8, 0, b"\x00" * 64)  # a few bytes declaring 10^10 pixels
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="pixels"):
        load_rgb(bomb)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ImageDecodeError, match="over the limit of 5,000"):
        load_rgb(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=5_000)
    assert load_rgb(encode(Image.new("RGB", (100, 100)), "PNG"), max_pixels=10_000).size == (
        100,
        100,
    )


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="empty file"):
        load_rgb({"bytes": None, "path": str(tmp_path / "empty.jpg")})
    with pytest.raises(ImageDecodeError, match="neither bytes nor a path"):
        load_rgb({"bytes": None, "path": None})
    (tmp_path / "page.jpg").write_bytes(b"<html>Not Found</html>")
    with pytest.raises(ImageDecodeError, match=r"page\.jpg.*HTML"):
        load_rgb(tmp_path / "page.jpg")


def test_error_pickles() -> None:
    # Raised in DataLoader / datasets worker processes, then re-raised in the main one.
    err = pickle.loads(pickle.dumps(ImageDecodeError("a.jpg", "truncated image data")))
    assert err.source == "a.jpg" and err.reason == "truncated image data"


# ---------------------------------------------------------------- counting and checking


def test_warn_skipped_once_and_all_failed() -> None:
    warn_skipped([], 10)  # nothing to say
    failures = [(f"img{i}.jpg", "truncated image data") for i in range(7)]
    with pytest.warns(SkippedImagesWarning) as record:
        warn_skipped(failures, 100)
    assert len(record) == 1
    msg = str(record[0].message)
    assert "7 of 100" in msg and "img0.jpg (truncated image data)" in msg and "2 more" in msg
    with pytest.raises(DataError, match="none of the 7 images could be decoded"):
        warn_skipped(failures, 7)


def test_decode_stats() -> None:
    stats = DecodeStats()
    good = encode(Image.new("RGB", (3, 3), RED), "PNG")
    assert stats.load(good) is not None
    assert stats.load(b"junk", name="junk.jpg") is None
    assert stats.total == 2 and stats.failures == [("junk.jpg", "not a recognised image format")]
    with pytest.warns(SkippedImagesWarning, match="1 of 2"):
        stats.report()


def test_check_images_on_a_dataset(tmp_path: Path) -> None:
    paths = []
    for i in range(10):
        path = tmp_path / f"{i}.jpg"
        data = encode(Image.new("RGB", (20, 20), (i * 20, 0, 0)), "JPEG")
        path.write_bytes(data[:40] if i in (3, 7) else data)
        paths.append({"bytes": None, "path": str(path)})
    ds = datasets.Dataset.from_dict(
        {"image_id": [str(i) for i in range(10)], "image": paths},
        features=datasets.Features(
            {"image_id": datasets.Value("string"), "image": datasets.Image(decode=False)}
        ),
    )
    good, failures = check_images(ds)
    assert good == [0, 1, 2, 4, 5, 6, 8, 9]
    assert [name for name, _ in failures] == ["3.jpg", "7.jpg"]
    assert check_images(ds.select([])) == ([], [])
