"""Caption one uploaded image into a JSON-ready dict: the part of the app that knows no HTTP.

Thread-safe: decoding runs in parallel (bounded, since a big PNG costs hundreds of MB while it
decodes), the model runs one request at a time under a lock.

Threads: the app uses one torch thread (`APP_THREADS`). Beam search is a chain of small matmuls
that a second thread does not speed up, and on a shared 2-core machine an OpenMP thread that
waits for a busy core stalls every op: with other jobs running (load average 7), a 640x480 JPEG
with beam 3 (EfficientNet-Lite0) took a median of 247 ms with 1 thread and 3.2 s with 2,
alternating request by request in one process.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter

from ..checkpoint import newest_checkpoint, resolve_checkpoint  # noqa: F401 (the app's names)
from ..data.images import ImageDecodeError, load_rgb
from ..errors import UserError
from ..inference import CaptionModel, load_model
from ..transforms import centre_square, model_box
from ..viz import heat_colours  # the paper-style figures' colour ramp, shared with the page

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
APP_THREADS = 1  # see the module docstring


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults keep a 2-core server responsive."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 64_000_000  # declared width * height (an 8000 x 8000 photo)
    max_beam: int = 10
    decode_slots: int = 2  # images decoding at once: bounds the memory big uploads take


def heat_png(alpha: np.ndarray, grid: int, size: int = 64) -> str:
    """One word's attention as a transparent heat-map PNG data URL (the browser scales it)."""
    a = np.asarray(alpha, dtype=np.float32).reshape(grid, grid)
    a = a / max(float(a.max()), 1e-8)
    up = Image.fromarray((a * 255).astype(np.uint8), "L").resize(
        (size, size), Image.Resampling.BICUBIC
    )
    up = up.filter(ImageFilter.GaussianBlur(size / grid / 3))
    rgba = np.dstack([heat_colours(np.asarray(up, dtype=np.float32) / 255.0), np.asarray(up)])
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, "PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def displayed_size(data: bytes) -> tuple[int, int, str]:
    """(width, height, format) as a viewer shows the file (EXIF rotation applied); header only."""
    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        try:
            rotated = im.getexif().get(_ORIENTATION) in (5, 6, 7, 8)
        except Exception:  # a malformed EXIF block: load_rgb ignored it too
            rotated = False
        return (h, w, im.format or "") if rotated else (w, h, im.format or "")


class CaptionService:
    """A loaded model plus the locks that make it safe to call from many threads."""

    def __init__(
        self,
        ckpt_path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        limits: Limits | None = None,
    ):
        if threads:
            torch.set_num_threads(threads)
        self.limits = limits or Limits()
        self.ckpt_path = Path(ckpt_path)
        self.cm: CaptionModel = load_model(self.ckpt_path, device=device)
        self._lock = threading.Lock()
        self._decode_slots = threading.BoundedSemaphore(self.limits.decode_slots)
        self.requests = 0
        # The first forward pass picks kernels and allocates; pay for it now, not in a request.
        self._run(Image.new("RGB", (320, 240), (120, 120, 120)), beam_size=3)
        self.requests = 0  # images captioned since startup

    @property
    def has_attention(self) -> bool:
        return getattr(self.cm.model.decoder, "attention", None) is not None

    def info(self) -> dict[str, Any]:
        """What `GET /api/model` shows: the checkpoint's own description of itself."""
        meta = self.cm.meta
        data = meta.get("data") or {}
        pp = self.cm.preprocess
        return {
            "checkpoint": str(self.ckpt_path),
            "encoder": meta.get("encoder"),
            "decoder": meta.get("decoder"),
            "vocab_size": len(self.cm.vocab),
            "max_caption_len": self.cm.vocab.max_len,
            "data": {k: data.get(k) for k in ("name", "args", "sizes") if k in data},
            "metrics": meta.get("metrics") or {},
            "monitor": meta.get("monitor"),
            "preprocess": pp.to_dict(),
            "grid": self.cm.grid,
            "num_regions": meta.get("num_regions"),
            "attention": self.has_attention,
            "code_version": meta.get("code_version"),
            "device": str(self.cm.device),
            "limits": {
                "max_upload_bytes": self.limits.max_upload_bytes,
                "max_pixels": self.limits.max_pixels,
                "max_beam": self.limits.max_beam,
            },
        }

    def decode(self, data: bytes, name: str = "upload") -> Image.Image:
        """Upright RGB, JPEGs decoded at the smallest scale that still covers the model's input."""
        with self._decode_slots:
            try:
                return load_rgb(
                    {"bytes": data, "path": name},
                    target_size=self.cm.preprocess.resize_size,
                    max_pixels=self.limits.max_pixels,
                )
            except ImageDecodeError:
                raise
            except (MemoryError, Image.DecompressionBombError) as e:
                raise ImageDecodeError(name, f"too large to decode ({type(e).__name__})") from None

    def _run(self, image: Image.Image, beam_size: int) -> list:
        x = self.cm.images_to_tensor([centre_square(image, self.cm.preprocess)])  # (1, 3, S, S)
        with self._lock, torch.inference_mode():
            self.requests += 1
            return self.cm.caption_tensor(x, beam_size=beam_size)[0]

    def caption(
        self, data: bytes, filename: str = "upload", beam_size: int = 3, overlays: bool = False
    ) -> dict[str, Any]:
        """Decode, caption and describe one image; `ImageDecodeError` for a file that is not one."""
        if not 1 <= beam_size <= self.limits.max_beam:
            raise UserError(f"beam_size must be between 1 and {self.limits.max_beam}")
        t0 = time.perf_counter()
        image = self.decode(data, filename)
        try:
            width, height, fmt = displayed_size(data)
        except Exception:  # it decoded, so this cannot really fail; never let it cost a caption
            width, height, fmt = *image.size, ""
        t1 = time.perf_counter()
        beams = self._run(image, beam_size)
        t2 = time.perf_counter()
        grid = self.cm.grid
        out_beams = []
        for hyp in beams:
            words = [self.cm.vocab.itos[t] for t in hyp.tokens]
            att = None
            if hyp.alphas is not None:
                a = hyp.alphas.double().numpy().round(4)  # (L, N); float64 prints short
                att = (a.reshape(len(words), grid, grid) if grid else a).tolist()
            out_beams.append(
                {
                    "caption": self.cm.text(hyp),
                    "words": words,
                    "score": round(hyp.score, 4),
                    "logprob": round(hyp.logprob, 4),
                    "attention": att,
                }
            )
        best = beams[0]
        pngs = None
        if overlays and best.alphas is not None and grid:
            pngs = [heat_png(a, grid) for a in best.alphas.numpy()]
        t3 = time.perf_counter()
        # The model's square in displayed-image pixels (the decoded image may be a JPEG draft).
        dw, dh = image.size
        pp = self.cm.preprocess
        box = model_box(dw, dh, pp)
        sx, sy = width / dw, height / dh
        return {
            "caption": out_beams[0]["caption"],
            "beams": out_beams,
            "grid": grid,
            "overlays": pngs,
            "image": {
                "filename": filename,
                "format": fmt,
                "width": width,
                "height": height,
                "crop": [
                    round(box[0] * sx, 1),
                    round(box[1] * sy, 1),
                    round(box[2] * sx, 1),
                    round(box[3] * sy, 1),
                ],
            },
            "beam_size": beam_size,
            "timings_ms": {
                "decode": round((t1 - t0) * 1000, 1),
                "model": round((t2 - t1) * 1000, 1),
                "postprocess": round((t3 - t2) * 1000, 1),
            },
        }
