"""The web app: a JSON API over `CaptionService` and one static page that uses it.

    create_app(ckpt_path)  ->  FastAPI app (the model loads once, here)
    POST /api/caption      multipart field "file" (or the raw image as the body) -> caption JSON
    GET  /api/health, /api/model, /openapi.json, /docs (/redoc leads there), /  (the page)

The upload limit is enforced while the body streams in, so a 5 GB upload costs at most the limit
in memory; every bad input is a 4xx JSON `{"detail": "..."}`, never a 5xx.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from ..data.images import ImageDecodeError
from ..errors import UserError
from .service import APP_THREADS, BATCH_WAIT_MS, MAX_BATCH, CaptionService, Limits

log = logging.getLogger("captioning.app")
STATIC = Path(__file__).parent / "static"
# Room for the multipart envelope (boundaries, part headers, a beam_size field) over the image.
ENVELOPE_BYTES = 64 * 1024


# ---------------------------------------------------------------- response shapes (for /docs)


class Beam(BaseModel):
    caption: str
    words: list[str]
    score: float  # log-probability / length**length_penalty: what beams are ranked by
    logprob: float
    attention: list[Any] | None  # (L, grid, grid) weights per word; (L, N) without a grid


class ImageInfo(BaseModel):
    filename: str
    format: str
    width: int
    height: int
    crop: list[float]  # (x0, y0, x1, y1): the square the model saw, in image pixels


class CaptionResponse(BaseModel):
    caption: str
    beams: list[Beam]  # best first
    grid: int | None
    overlays: list[str] | None  # PNG data URLs per word of the best beam (?overlays=true)
    image: ImageInfo
    beam_size: int
    warnings: list[str]  # damaged image data, a caption cut off at the length limit
    batch_size: int  # images beam-searched together with this one (1: alone)
    timings_ms: dict[str, float]


class ErrorResponse(BaseModel):
    detail: str


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "beam_size": {"type": "integer", "minimum": 1},
                    },
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


class ClientError(Exception):
    """Becomes a 4xx JSON response."""

    def __init__(self, status: int, detail: str, close: bool = False):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.close = close  # the body was not read to its end: the connection cannot be reused


# ---------------------------------------------------------------- reading the upload


async def read_body(request: Request, limits: Limits) -> bytes:
    """The request body, or a 413 once it passes `limits.max_upload_bytes` plus the envelope.

    An over-limit body is read to its end and thrown away before the 413 goes out, up to
    `limits.drain_bytes`: a client that sends its whole body before reading the answer (a browser
    form, urllib, anything without `Expect: 100-continue`) would otherwise meet a closed socket
    and report a broken pipe instead of the 413. Past that cap, or when the client waits for
    `100 Continue`, the 413 goes out at once and the connection closes.
    """
    limit = limits.max_upload_bytes + ENVELOPE_BYTES
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ClientError(400, "invalid Content-Length header") from None
        if size > limit:
            waits = request.headers.get("expect", "").lower() == "100-continue"
            if waits or size > limits.drain_bytes:
                raise ClientError(413, too_large(limits, size), close=True)
            await _drain(request.stream(), limits.drain_bytes)
            raise ClientError(413, too_large(limits, size))
    chunks, size = [], 0
    stream = request.stream()
    async for chunk in stream:
        size += len(chunk)
        if size > limit:  # a chunked upload that never declared its length
            total = await _drain(stream, limits.drain_bytes - size)
            if total is None:
                raise ClientError(413, too_large(limits), close=True)
            raise ClientError(413, too_large(limits, size + total))
        chunks.append(chunk)
    return b"".join(chunks)


async def _drain(stream: AsyncIterator[bytes], budget: int) -> int | None:
    """Read and discard the rest of the body: its size, or None once it passes `budget`."""
    n = 0
    async for chunk in stream:
        n += len(chunk)
        if n > budget:
            return None
    return n


def too_large(limits: Limits, size: int | None = None) -> str:
    """The one message for an upload over the limit, whichever check caught it."""
    what = f"upload too large ({size / 2**20:.1f} MB)" if size else "upload too large"
    return f"{what}: the limit is {limits.max_upload_bytes / 2**20:.3g} MB"


async def parse_upload(request: Request, limits: Limits) -> tuple[bytes, str, dict[str, str]]:
    """(image bytes, file name, other form fields) from a multipart form or a raw image body."""
    ctype = request.headers.get("content-type", "")
    if ctype.startswith("application/x-www-form-urlencoded"):
        raise ClientError(
            415, "send the image as multipart/form-data (field 'file') or as the raw request body"
        )
    body = await read_body(request, limits)
    if not ctype.startswith("multipart/form-data"):
        if len(body) > limits.max_upload_bytes:
            raise ClientError(413, too_large(limits, len(body)))
        return body, "upload", {}

    async def stream():
        yield body
        yield b""

    parser = MultiPartParser(
        Headers(raw=request.scope["headers"]),
        stream(),
        max_files=1,
        max_fields=8,
        max_part_size=1024,
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise ClientError(400, f"malformed multipart form: {e.message}") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
            if not files:
                raise ClientError(400, "no file in the form: upload the image as field 'file'")
            upload = files[0]
        data = await upload.read()
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        name = Path(upload.filename or "upload").name[:200]
    finally:
        await form.close()
    if len(data) > limits.max_upload_bytes:
        raise ClientError(413, too_large(limits, len(data)))
    return data, name, fields


# ---------------------------------------------------------------- the app


def create_app(
    ckpt_path: str | Path,
    device: str = "cpu",
    threads: int | None = APP_THREADS,
    limits: Limits | None = None,
    service: CaptionService | None = None,
    batch_wait_ms: float = BATCH_WAIT_MS,
    max_batch: int = MAX_BATCH,
) -> FastAPI:
    """Load the model once and build the app; `service` lets tests share one loaded model."""
    svc = service or CaptionService(
        ckpt_path,
        device=device,
        threads=threads,
        limits=limits,
        batch_wait_ms=batch_wait_ms,
        max_batch=max_batch,
    )
    limits = svc.limits

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if service is None:  # a service handed in belongs to the caller
            svc.close()

    # Swagger UI from the files fastapi-offline installs, not a CDN: /docs works offline. ReDoc
    # is left out: its page loads a logo from the vendor's CDN whatever the options say.
    app = FastAPIOffline(
        title="Show, Attend and Tell",
        redoc_url=None,
        # No "validate this spec" badge: it would send the spec to an outside service.
        swagger_ui_parameters={"validatorUrl": None},
        lifespan=lifespan,
        version=str(svc.cm.meta.get("code_version") or "0"),
        description="Caption an image and see where the model looked for each word. "
        "Upload with `curl -F file=@photo.jpg http://HOST/api/caption?beam_size=3`.",
    )
    app.state.service = svc
    started = time.time()

    @app.exception_handler(ClientError)
    async def client_error(_: Request, e: ClientError) -> JSONResponse:
        headers = {"connection": "close"} if e.close else None
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_params(_: Request, e: RequestValidationError) -> JSONResponse:
        msgs = [f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}" for err in e.errors()]
        return JSONResponse({"detail": "; ".join(msgs)}, status_code=422)

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {
            "status": "ok",
            "checkpoint": str(svc.ckpt_path),
            "device": str(svc.cm.device),
            "uptime_s": round(time.time() - started, 1),
            "requests": svc.requests,
        }

    @app.get("/api/model")
    def model_info() -> dict[str, Any]:
        return svc.info()

    @app.post(
        "/api/caption",
        response_model=CaptionResponse,
        responses={c: {"model": ErrorResponse} for c in (400, 413, 415, 422)},
        openapi_extra=UPLOAD_BODY,
    )
    async def caption(
        request: Request,
        beam_size: int | None = Query(
            None, ge=1, le=limits.max_beam, description="beams to search (default 3)"
        ),
        overlays: bool = Query(False, description="also return PNG heat maps per word"),
    ) -> JSONResponse:
        """Caption one image: the beams best first, each word's attention over the image grid."""
        arrived = svc.announce()  # a batch starting now waits for this upload
        try:
            data, name, fields = await parse_upload(request, limits)
            if beam_size is None:
                beam_size = _int_field(fields.get("beam_size"), 3, limits.max_beam)
            result = await run_in_threadpool(svc.caption, data, name, beam_size, overlays, arrived)
        except ImageDecodeError as e:
            raise ClientError(400, f"not a usable image: {e.reason}") from None
        except UserError as e:
            raise ClientError(422, str(e)) from None
        finally:
            arrived()
        # Already plain JSON types: skip re-validating ~1,500 attention floats per request.
        return JSONResponse(result)

    @app.get("/redoc", include_in_schema=False)
    def redoc() -> RedirectResponse:
        return RedirectResponse("/docs")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _int_field(value: str | None, default: int, high: int) -> int:
    if value in (None, ""):
        return default
    try:
        n = int(value)
    except ValueError:
        raise ClientError(422, f"beam_size: not an integer: {value[:20]!r}") from None
    if not 1 <= n <= high:
        raise ClientError(422, f"beam_size must be between 1 and {high}")
    return n
