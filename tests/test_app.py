"""Web app API: odd and hostile uploads through the TestClient, limits, concurrency on a live server.

Every upload either gets a caption or a 4xx JSON error with a clear message, never a 5xx.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captioning.app.server import create_app
from captioning.app.service import (
    CaptionService,
    Limits,
    jpeg_damage,
    length_warning,
    newest_checkpoint,
)
from conftest import ROOT, compose_cfg

sys.path.insert(0, str(ROOT))  # for train.py

# ---------------------------------------------------------------- a trained checkpoint


def trained_checkpoint(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> Path:
    """Train the tiny model once per session (as tests/test_train.py does); later calls reuse it."""
    out = tmp_path_factory.getbasetemp() / "tiny-app-model"
    ckpt = out / "checkpoints" / "last.ckpt"
    if not ckpt.is_file():
        import train as train_script

        cfg = compose_cfg(
            "train",
            ["debug=tiny", "trainer.accelerator=cpu", "test=false", "trainer.max_epochs=1"],
            out=out,
            cache=cache,
        )
        train_script.train(cfg)
    return ckpt


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, data_cache)


@pytest.fixture(scope="module")
def service(tiny_ckpt) -> CaptionService:
    svc = CaptionService(tiny_ckpt)
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def client(service):
    from fastapi.testclient import TestClient

    with TestClient(create_app(service.ckpt_path, service=service)) as c:
        yield c


# ---------------------------------------------------------------- files to upload


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def scene(size: tuple[int, int] = (96, 72), seed: int = 0) -> Image.Image:
    """A few coloured blocks on a gradient, so captions have something to see."""
    rng = np.random.default_rng(seed)
    w, h = size
    a = np.zeros((h, w, 3), np.uint8)
    a[...] = np.linspace(40, 200, w, dtype=np.uint8)[None, :, None]
    for _ in range(3):
        x, y = rng.integers(0, max(1, w - w // 4)), rng.integers(0, max(1, h - h // 4))
        a[y : y + h // 4 + 1, x : x + w // 4 + 1] = rng.integers(0, 255, 3)
    return Image.fromarray(a)


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height (a decompression bomb's signature)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def animated_gif() -> bytes:
    frames = [scene(seed=i).convert("P") for i in range(3)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=80, loop=0)


def exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees to display: stored 80x40 is shown as 40x80
    return encode(scene((80, 40)), "JPEG", exif=exif)


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("photo.jpg", encode(scene(), "JPEG"))
    return buf.getvalue()


def damaged_jpeg(progressive: bool = False) -> bytes:
    """A 640x480 photo-like JPEG with 2 KB zeroed in the middle: Pillow decodes it silently."""
    rng = np.random.default_rng(0)
    a = np.linspace(0, 215, 640, dtype=np.float32)[None, :, None] + rng.integers(0, 40, (480, 1, 3))
    data = bytearray(encode(Image.fromarray(a.astype(np.uint8)), "JPEG", progressive=progressive))
    middle = len(data) // 2
    data[middle : middle + 2048] = bytes(2048)
    return bytes(data)


GOOD = {
    "jpeg": lambda: encode(scene(), "JPEG"),
    "png": lambda: encode(scene(), "PNG"),
    "animated_gif": animated_gif,
    "png_16bit": lambda: encode(
        Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)), "PNG"
    ),
    "cmyk_jpeg": lambda: encode(scene().convert("CMYK"), "JPEG"),
    "rgba_png": lambda: encode(scene().convert("RGBA"), "PNG"),
    "palette_png_transparent": lambda: encode(scene().convert("P"), "PNG", transparency=0),
    "grayscale": lambda: encode(scene().convert("L"), "JPEG"),
    "one_pixel": lambda: encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
    "very_wide": lambda: encode(scene((6000, 3)), "PNG"),
    "very_tall": lambda: encode(scene((2, 5000)), "PNG"),
    "exif_rotated": exif_rotated,
    "large_photo_jpeg": lambda: encode(scene((6000, 4000)), "JPEG", quality=70),
    "large_png": lambda: encode(scene((3000, 2000)), "PNG", compress_level=1),
    "webp": lambda: encode(scene(), "WEBP"),
    "bmp": lambda: encode(scene(), "BMP"),
    "tiff": lambda: encode(scene(), "TIFF"),
}

BAD = {
    "empty": (b"", "empty"),
    "truncated_jpeg": (encode(scene((256, 192)), "JPEG")[:1500], "truncated"),
    "text": (b"just some text, no picture\n" * 10, "not a recognised image"),
    "svg": (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
    "pdf": (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n%%EOF\n", "PDF"),
    "zip": (zip_bytes(), "ZIP"),
    "html": (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "HTML"),
    "bomb_over_limit": (png_declaring(10_000, 10_000), "over the limit"),
    "bomb_huge": (png_declaring(100_000, 100_000), "decompression bomb"),
    "garbage_jpeg_header": (b"\xff\xd8\xff\xe0" + b"\x00" * 200, "image"),
}


def post(client, data: bytes, name: str = "x.jpg", **params):
    return client.post("/api/caption", params=params, files={"file": (name, data)})


# ---------------------------------------------------------------- endpoints


def test_health(client):
    r = client.get("/api/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


def test_model_info_comes_from_the_checkpoint(client):
    info = client.get("/api/model").json()
    assert info["encoder"]["name"] == "small_cnn"
    assert info["decoder"]["name"] == "soft_attention"
    assert info["vocab_size"] > 4
    assert info["data"]["name"] == "synthetic"
    assert "val/bleu4" in info["metrics"]
    assert info["grid"] and info["attention"] is True
    assert info["limits"]["max_upload_bytes"] == 10 * 2**20


def test_openapi_and_docs(client):
    spec = client.get("/openapi.json").json()
    assert {"/api/caption", "/api/health", "/api/model"} <= set(spec["paths"])
    body = spec["paths"]["/api/caption"]["post"]["requestBody"]["content"]
    assert body["multipart/form-data"]["schema"]["properties"]["file"]["format"] == "binary"
    assert "CaptionResponse" in spec["components"]["schemas"]
    assert client.get("/docs").status_code == 200


def test_api_docs_need_no_network(client):
    """Swagger UI comes from an installed package, not a CDN, so /docs works offline."""
    html = client.get("/docs")
    assert html.status_code == 200
    assert "http://" not in html.text and "https://" not in html.text, html.text
    assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
    assert any(a.endswith(".js") for a in assets)
    for asset in assets:
        r = client.get(asset)
        assert r.status_code == 200, asset
        assert len(r.content) > 1000 or asset.endswith(".png"), asset
    # ReDoc's page fetches a logo from its vendor's CDN: /redoc leads to /docs instead.
    r = client.get("/redoc", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/docs"


def test_page_and_its_assets(client):
    page = client.get("/")
    assert page.status_code == 200 and "Show, Attend and Tell" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert client.get(asset).status_code == 200


def test_caption_response_shape(client, service):
    r = post(client, encode(scene((640, 480)), "JPEG"), beam_size=3)
    assert r.status_code == 200, r.text
    body = r.json()
    grid = service.cm.grid
    assert body["grid"] == grid and body["beam_size"] == 3
    assert body["caption"] == body["beams"][0]["caption"]
    beams = body["beams"]
    assert 1 <= len(beams) <= 3
    assert [b["score"] for b in beams] == sorted((b["score"] for b in beams), reverse=True)
    for b in beams:
        assert b["caption"] == " ".join(b["words"])
        att = np.asarray(b["attention"])
        assert att.shape == (len(b["words"]), grid, grid)
        np.testing.assert_allclose(att.sum(axis=(1, 2)), 1.0, atol=0.01)
    image = body["image"]
    assert (image["width"], image["height"], image["format"]) == (640, 480, "JPEG")
    x0, y0, x1, y1 = image["crop"]
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480
    assert x1 - x0 == pytest.approx(y1 - y0)
    assert body["overlays"] is None  # only on request
    assert len(r.content) < 60_000  # compact


def test_overlays_on_request(client):
    body = post(client, encode(scene(), "PNG"), overlays="true").json()
    words = body["beams"][0]["words"]
    assert len(body["overlays"]) == len(words)
    assert all(o.startswith("data:image/png;base64,") for o in body["overlays"])


def test_raw_image_body(client):
    r = client.post(
        "/api/caption", content=encode(scene(), "JPEG"), headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 200, r.text
    assert r.json()["image"]["format"] == "JPEG"


def test_same_image_same_caption_as_the_model(client, service):
    data = encode(scene(seed=3), "PNG")
    assert post(client, data).json()["caption"] == service.caption(data)["caption"]


@pytest.mark.parametrize("name", list(GOOD))
def test_odd_but_valid_images_get_a_caption(client, name):
    r = post(client, GOOD[name](), name=f"{name}.bin")
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body["caption"], str) and body["beams"]
    if name == "exif_rotated":
        assert (body["image"]["width"], body["image"]["height"]) == (40, 80)


@pytest.mark.parametrize("name", list(BAD))
def test_hostile_uploads_get_a_clear_4xx(client, name):
    data, words = BAD[name]
    r = post(client, data, name=f"{name}.jpg")
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail
    assert words.lower() in detail.lower()


@pytest.mark.parametrize("progressive", [False, True])
def test_damaged_jpeg_is_captioned_with_a_warning(client, progressive):
    """A user would rather have a caption and a word of warning than nothing: most of a damaged
    photo is still there (the browser shows it, grey blocks and all)."""
    r = post(client, damaged_jpeg(progressive), name="damaged.jpg")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["caption"]
    damage = [w for w in body["warnings"] if "damaged" in w]
    assert len(damage) == 1 and "Corrupt JPEG data" in damage[0]  # libjpeg-turbo's diagnosis


@pytest.mark.parametrize("name", ["jpeg", "cmyk_jpeg", "grayscale", "exif_rotated", "png"])
def test_intact_images_have_no_warnings(client, name):
    body = post(client, GOOD[name]()).json()
    assert isinstance(body["warnings"], list)
    assert not [w for w in body["warnings"] if "damaged" in w]


def test_jpeg_damage_verdicts():
    photo = damaged_jpeg()
    assert jpeg_damage(photo).startswith("Corrupt JPEG data")
    rng = np.random.default_rng(1)
    noisy = bytearray(encode(scene((640, 480)), "JPEG"))
    noisy[len(noisy) // 2 : len(noisy) // 2 + 512] = rng.integers(0, 256, 512, np.uint8).tobytes()
    assert jpeg_damage(bytes(noisy)) is not None
    for fmt in ("JPEG", "PNG"):
        assert jpeg_damage(encode(scene((640, 480)), fmt)) is None
    assert jpeg_damage(encode(scene().convert("CMYK"), "JPEG")) is None
    assert jpeg_damage(b"\xff\xd8 not a jpeg at all") is None  # no verdict: Pillow refuses it


def test_a_caption_cut_off_at_the_length_limit_says_so(tiny_ckpt):
    svc = CaptionService(tiny_ckpt, batch_wait_ms=0)
    svc.cm.vocab.max_len = 2  # every caption runs to the limit
    body = svc.caption(encode(scene(), "PNG"))
    assert len(body["beams"][0]["words"]) == 2
    assert body["warnings"] == [length_warning(2)]


@pytest.mark.parametrize(
    "params, form",
    [
        ({"beam_size": 0}, None),
        ({"beam_size": 11}, None),
        ({"beam_size": "x"}, None),
        ({}, {"beam_size": "99"}),
        ({}, {"beam_size": "two"}),
    ],
)
def test_beam_size_out_of_limits_is_422(client, params, form):
    r = client.post(
        "/api/caption", params=params, data=form, files={"file": ("a.jpg", encode(scene(), "JPEG"))}
    )
    assert r.status_code == 422
    assert "beam_size" in r.json()["detail"]


def test_beam_size_as_form_field(client):
    r = client.post(
        "/api/caption", data={"beam_size": "5"}, files={"file": ("a.jpg", encode(scene(), "JPEG"))}
    )
    assert r.status_code == 200 and r.json()["beam_size"] == 5


def test_malformed_requests_are_4xx(client):
    r = client.post("/api/caption", data={"beam_size": "3"})  # form without a file
    assert r.status_code in (400, 415) and r.json()["detail"]
    r = client.post(
        "/api/caption",
        content=b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
        headers={"content-type": "multipart/form-data; boundary=xyz"},
    )
    assert 400 <= r.status_code < 500
    r = client.post("/api/caption", files={"other": ("a.txt", b"")})
    assert 400 <= r.status_code < 500


# ---------------------------------------------------------------- the upload limit


@pytest.fixture(scope="module")
def small_limit_client(tiny_ckpt):
    from fastapi.testclient import TestClient

    limits = Limits(max_upload_bytes=50_000)
    with TestClient(create_app(tiny_ckpt, limits=limits)) as c:
        yield c


def test_upload_over_the_limit_is_413(small_limit_client):
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    data = encode(Image.fromarray(big), "PNG")
    assert len(data) > 50_000
    r = post(small_limit_client, data)
    assert r.status_code == 413 and "limit" in r.json()["detail"]
    r = small_limit_client.post("/api/caption", content=data, headers={"content-type": "image/png"})
    assert r.status_code == 413


def test_chunked_upload_over_the_limit_is_413(small_limit_client):
    def chunks():  # no Content-Length: the limit must hold while the body streams
        for _ in range(100):
            yield b"\0" * 10_000

    r = small_limit_client.post(
        "/api/caption", content=chunks(), headers={"content-type": "image/jpeg"}
    )
    assert r.status_code == 413


def test_every_413_names_the_same_limit(small_limit_client):
    """Raw body, multipart form, chunked stream: one limit (50,000 bytes) in every message."""
    big = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    data = encode(Image.fromarray(big), "PNG")
    just_over = data[: 50_000 + 1]  # the form's envelope still fits: the file part is checked
    replies = [
        post(small_limit_client, data),
        post(small_limit_client, just_over),
        small_limit_client.post(
            "/api/caption", content=data, headers={"content-type": "image/png"}
        ),
        small_limit_client.post(
            "/api/caption",
            content=iter([data[i : i + 10_000] for i in range(0, len(data), 10_000)]),
            headers={"content-type": "image/png"},
        ),
    ]
    for r in replies:
        assert r.status_code == 413
        assert r.json()["detail"].endswith("the limit is 0.0477 MB"), r.json()


def test_newest_checkpoint(tmp_path):
    assert newest_checkpoint(tmp_path) is None
    old, new = tmp_path / "a" / "old.ckpt", tmp_path / "b" / "c" / "new.ckpt"
    for p in (old, new):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
    t = time.time()
    os.utime(old, (t - 100, t - 100))
    assert newest_checkpoint(tmp_path) == new


# ---------------------------------------------------------------- a live server on 127.0.0.1


@pytest.fixture(scope="module")
def live_server(service):
    """uvicorn in a thread of this process, sharing the loaded model; yields its base URL."""
    import uvicorn

    app = create_app(service.ckpt_path, service=service)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", port
    server.should_exit = True
    thread.join(timeout=10)


def test_sixteen_concurrent_clients(live_server, service):
    import httpx

    url, _ = live_server
    images = [encode(scene((64 + 8 * i, 48 + 4 * i), seed=i), "PNG") for i in range(16)]
    expected = [service.caption(d)["caption"] for d in images]
    results: list = [None] * 16
    barrier = threading.Barrier(16)

    def worker(i: int) -> None:
        with httpx.Client(timeout=120) as c:
            barrier.wait()
            r = c.post(url + "/api/caption", files={"file": (f"{i}.png", images[i])})
            results[i] = (r.status_code, r.json())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    for i, (status, body) in enumerate(results):
        assert status == 200, body
        assert body["caption"] == expected[i]  # each client got its own image's caption
        assert body["image"]["width"] == 64 + 8 * i


def test_huge_upload_is_refused_while_it_streams(live_server):
    """A chunked body far over the limit: the server answers 413 long before it has been sent."""
    _, port = live_server
    head = (
        b"POST /api/caption HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    chunk = b"%x\r\n" % 65536 + b"\0" * 65536 + b"\r\n"
    sent, reply, pending = 0, b"", b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        try:
            while sent < 200 * 2**20 and b"\r\n\r\n" not in reply:  # at most 200 MB
                pending = pending or chunk
                try:
                    n = sock.send(pending)
                    pending, sent = pending[n:], sent + n
                except BlockingIOError:
                    time.sleep(0.001)
                with contextlib.suppress(BlockingIOError):
                    reply += sock.recv(65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        sock.settimeout(10)
        try:
            while b"\r\n\r\n" not in reply:
                more = sock.recv(65536)
                if not more:
                    break
                reply += more
        except (ConnectionResetError, TimeoutError):
            pass
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert sent < 40 * 2**20  # refused after about the limit (10 MB), not after 200 MB


@pytest.mark.parametrize("form", [False, True])
def test_over_limit_upload_from_an_ordinary_client_gets_the_413(live_server, form):
    """urllib, like a browser form, sends its whole body (no `Expect: 100-continue`) and then
    reads the answer: the server reads the 11 MB to the end before it says 413."""
    url, _ = live_server
    data = b"\xff\xd8" + bytes(11 * 2**20)
    if form:
        boundary = "x7MA4YWxkTrZu0gW"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        data = head + data + f"\r\n--{boundary}--\r\n".encode()
        ctype = f"multipart/form-data; boundary={boundary}"
    else:
        ctype = "image/jpeg"
    request = urllib.request.Request(
        url + "/api/caption", data=data, headers={"Content-Type": ctype}
    )
    with pytest.raises(urllib.error.HTTPError) as answer:
        urllib.request.urlopen(request, timeout=60)
    assert answer.value.code == 413
    detail = json.loads(answer.value.read())["detail"]
    assert detail == "upload too large (11.0 MB): the limit is 10 MB"


def test_app_entry_trains_a_model_when_there_is_none(tmp_path, monkeypatch, capsys):
    from captioning.app import __main__ as entry

    monkeypatch.chdir(ROOT)  # where train.py is
    calls = []

    def fake_train(cmd: list[str]) -> int:
        calls.append(cmd)
        run_dir = Path(cmd[2].removeprefix("hydra.run.dir="))
        (run_dir / "checkpoints").mkdir(parents=True)
        (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
        return 0

    monkeypatch.setattr(entry.subprocess, "call", fake_train)
    args = entry.parse_args(["--train-if-missing", "--outputs", str(tmp_path)])
    assert entry.find_or_train(args).parent.parent.parent == tmp_path / "train" / "runs"
    assert calls[0][1] == "train.py"
    assert "training the built-in model first" in capsys.readouterr().out


def test_app_entry_user_errors_exit_2(tmp_path, capsys):
    from captioning.app import __main__ as entry

    with pytest.raises(SystemExit) as e:
        entry.main(["--outputs", str(tmp_path)])  # nothing there, and no --train-if-missing
    assert e.value.code == 2
    assert "no checkpoint given" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        entry.main(["--ckpt", str(tmp_path / "missing.ckpt")])
    assert e.value.code == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_the_app_imports_neither_lightning_nor_hydra():
    code = (
        "import sys, captioning.app.server, captioning.app.__main__; "
        "print([m for m in ('lightning', 'hydra', 'matplotlib') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
