"""Caption one uploaded image into a JSON-ready dict: the part of the app that knows no HTTP.

Thread-safe: decoding runs in parallel (bounded, since a big PNG costs hundreds of MB while it
decodes). With batching on (`batch_wait_ms` > 0, the default) a `Batcher` thread encodes and
beam-searches the images of concurrent requests together; with it off the model runs one
request at a time under a lock. Either way one thread runs the model.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import simplejpeg
import torch
from PIL import Image, ImageFilter
from torch import Tensor

from ..checkpoint import newest_checkpoint, resolve_checkpoint  # noqa: F401 (the app's names)
from ..data.images import ImageDecodeError, load_rgb
from ..decoding import DecodeConfig, Hypothesis
from ..errors import UserError
from ..inference import CaptionModel, load_model
from ..transforms import centre_square, model_box
from ..viz import heat_colours  # the paper-style figures' colour ramp, shared with the page
from .batching import Batcher, Job
from .model_card import model_card

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 swap width and height
APP_THREADS = 1  # see the module docstring
BATCH_WAIT_MS = 50.0  # longest a batch waits for requests still on their way; 0: no batching
MAX_BATCH = 16
CPU_ENCODE_CHUNK = 2  # images per encoder call in a batch on a CPU (see `CaptionService._search`)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the defaults keep a 2-core server responsive."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 64_000_000  # declared width * height (an 8000 x 8000 photo)
    max_beam: int = 10
    decode_slots: int = 2  # images decoding at once: bounds the memory big uploads take

    @property
    def drain_bytes(self) -> int:
        """An upload over the limit is read and discarded up to this size, so its client reads
        the 413 (see `server.read_body`); past it the connection is closed."""
        return 2 * self.max_upload_bytes + 2**16


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


# libjpeg-turbo's recoverable errors that mean the picture itself is damaged; the others
# ("Warning: unknown JFIF revision number", a bad ICC marker) leave every pixel as it should be.
_DAMAGE = ("Corrupt JPEG data", "Premature end", "Invalid SOS", "Inconsistent progression")


def jpeg_damage(data: bytes) -> str | None:
    """What libjpeg-turbo says is wrong with a JPEG that still decodes, or None.

    Pillow decodes a JPEG with a damaged stretch (2 KB zeroed, say) without a word: the blocks
    from there on come out grey or shifted. libjpeg-turbo notices (data left over, or missing,
    when the last block is decoded) but Pillow drops its warnings, so the file is decoded a
    second time here in strict mode, in grey at 1/8 scale: the entropy decoding that finds the
    damage runs in full, the costly upsampling does not (~2 ms for a 640x480 photo).
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    fast = {"colorspace": "GRAY", "min_height": 1, "min_width": 1, "min_factor": 8}
    try:
        simplejpeg.decode_jpeg(data, strict=True, **fast)
        return None
    except ValueError as e:
        message = str(e).strip()
    try:  # a recoverable error is one the lenient decoder gets past
        simplejpeg.decode_jpeg(data, strict=False, **fast)
    except ValueError:
        return None  # a JPEG variant libjpeg-turbo cannot read, but Pillow could: no verdict
    if message.startswith(_DAMAGE) and "ICC" not in message:
        return message
    return None


def _nothing() -> None:
    pass


class CaptionService:
    """A loaded model plus the locks that make it safe to call from many threads.

    `batch_wait_ms` > 0: concurrent requests are beam-searched together (`Batcher`); 0: each
    request runs alone under a lock, encoder and decoder both.
    """

    def __init__(
        self,
        ckpt_path: str | Path,
        device: str = "cpu",
        threads: int | None = None,
        limits: Limits | None = None,
        batch_wait_ms: float = BATCH_WAIT_MS,
        max_batch: int = MAX_BATCH,
    ):
        if batch_wait_ms < 0 or max_batch < 1:
            raise UserError("batch_wait_ms must be >= 0 and max_batch >= 1")
        if threads:
            torch.set_num_threads(threads)
        self.limits = limits or Limits()
        self.ckpt_path = Path(ckpt_path)
        self.cm: CaptionModel = load_model(self.ckpt_path, device=device)
        self.card = model_card(self.cm.meta, self.ckpt_path)
        self._lock = threading.Lock()  # the model, when requests run alone
        self._decode_slots = threading.BoundedSemaphore(self.limits.decode_slots)
        self._count = threading.Lock()
        self.batch_wait_ms, self.max_batch = batch_wait_ms, max_batch
        self.encode_chunk = max_batch if self.cm.device.type == "cuda" else CPU_ENCODE_CHUNK
        self.batcher = (
            Batcher(self._search, batch_wait_ms / 1000, max_batch) if batch_wait_ms > 0 else None
        )
        self.requests = 0
        # The first forward pass picks kernels and allocates; pay for it now, not in a request.
        self._run(self._prepare(Image.new("RGB", (320, 240), (120, 120, 120))), beam_size=3)
        self.requests = 0  # images captioned since startup

    def close(self) -> None:
        """Stop the batching thread (after the requests it holds)."""
        if self.batcher is not None:
            self.batcher.close()

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
            **self.card,
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
            "batching": {"wait_ms": self.batch_wait_ms, "max_batch": self.max_batch},
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

    def _search(self, jobs: list[Job]) -> list[list[Hypothesis]]:
        """Encode and beam-search a batch of images (all of one beam size), on the batch thread.

        The encoder gains nothing from a batch on a CPU, so it runs there on `encode_chunk`
        images at a time (EfficientNet-Lite2, 1 thread, load 9: 99, 94, 121 and 179 ms per image
        in chunks of 1, 2, 4 and 16: the activations of a big chunk leave the cache); on a GPU
        the whole batch. Encoding in each request's own thread, beside the search, was slower on
        a loaded 2-core machine (2.4 vs 3.0 requests/s, 16 clients): the images then reached
        the search one by one.
        """
        x = torch.cat([job.images for job in jobs])  # (B, 3, S, S)
        with torch.inference_mode():
            step = self.encode_chunk
            feats = torch.cat(
                [self.cm.model.encode(x[i : i + step]) for i in range(0, len(x), step)]
            )  # (B, N, D)
            beams = self.cm.model.generate(
                feats, self.cm.vocab, DecodeConfig(beam_size=jobs[0].beam_size)
            )
        with self._count:
            self.requests += len(jobs)
        return beams

    def announce(self) -> Callable[[], None]:
        """A request has come (its upload may still be on its way): a batch about to start waits
        for it. Returns the function that says it has submitted its image or given up."""
        return self.batcher.expect() if self.batcher else _nothing

    def _prepare(self, image: Image.Image) -> Tensor:
        """The model's input (1, 3, S, S)."""
        return self.cm.images_to_tensor([centre_square(image, self.cm.preprocess)])

    def _run(
        self, prepared: Tensor, beam_size: int, arrived: Callable[[], None] = _nothing
    ) -> tuple[list[Hypothesis], int]:
        """(beams best first, images in the batch they were searched in)."""
        if self.batcher is None:
            with self._lock, torch.inference_mode():
                with self._count:
                    self.requests += 1
                return self.cm.caption_tensor(prepared, beam_size=beam_size)[0], 1
        job = self.batcher.submit(prepared, beam_size)
        arrived()
        return job.future.result(), job.batch_size

    def caption(
        self,
        data: bytes,
        filename: str = "upload",
        beam_size: int = 3,
        overlays: bool = False,
        arrived: Callable[[], None] | None = None,
    ) -> dict[str, Any]:
        """Decode, caption and describe one image; `ImageDecodeError` for a file that is not one.

        `arrived`: from `announce()` when the request came, else announced here.
        """
        if not 1 <= beam_size <= self.limits.max_beam:
            raise UserError(f"beam_size must be between 1 and {self.limits.max_beam}")
        t0 = time.perf_counter()
        arrived = arrived or self.announce()
        try:
            image = self.decode(data, filename)
            try:
                width, height, fmt = displayed_size(data)
            except Exception:  # it decoded, so this cannot really fail; never cost a caption
                width, height, fmt = *image.size, ""
            warnings = []
            # Damaged data is captioned, with a warning, rather than refused: most of the
            # picture is usually intact (the browser shows it, grey blocks and all), and the
            # user keeps a caption and learns why it may be off; a file that does not decode
            # at all is a 400.
            damage = jpeg_damage(data) if fmt == "JPEG" else None
            if damage:
                warnings.append(
                    f"the image data is damaged ({damage}): part of the picture decodes as grey "
                    "or shifted blocks, and the caption may describe them"
                )
            t1 = time.perf_counter()
            beams, batch_size = self._run(self._prepare(image), beam_size, arrived)
        finally:
            arrived()
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
        if len(best.tokens) >= self.cm.vocab.max_len:
            warnings.append(length_warning(self.cm.vocab.max_len))
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
            "warnings": warnings,
            "batch_size": batch_size,  # images beam-searched together with this one
            "timings_ms": {
                "decode": round((t1 - t0) * 1000, 1),
                "model": round((t2 - t1) * 1000, 1),
                "postprocess": round((t3 - t2) * 1000, 1),
            },
        }


def length_warning(max_len: int) -> str:
    """Said when the best caption ran to the length limit: it was cut off, not finished."""
    return (
        f"the caption reached the limit of {max_len} words without ending: the model was unsure "
        "of this image (it may repeat itself), so it was cut off"
    )
