"""The page in headless Chromium: upload a photo, see the caption, beams and per-word attention.

Needs Debian's chromium + chromium-driver and selenium (.ci/run installs them); skips otherwise.
Saves screenshots to outputs/test-artifacts/ (app.png, docs.png). Chromium resolves no host name
but 127.0.0.1, so everything the pages need must come from the app itself.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps
from test_app import damaged_jpeg, encode, scene, trained_checkpoint

from conftest import ROOT, SHARED

pytestmark = pytest.mark.slow
ARTIFACTS = ROOT / "outputs" / "test-artifacts"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1350",
    # No network: every host name but the app's fails to resolve (the page, /docs and /redoc
    # must not need a CDN); `outside_requests` lists whatever was tried all the same.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, data_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, data_cache)


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    """The real server (`python -m captioning.app`) in a subprocess on a free 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "captioning.app", "--ckpt", str(tiny_ckpt), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(url + "/api/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the app did not start in 180 s"
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture
def browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium; .ci/run installs it)")
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("no Chromium: apt-get install chromium chromium-driver (.ci/run installs them)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})  # every request made
    # An explicit chromedriver: selenium then never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def outside_requests(browser, server: str) -> list[str]:
    """Network URLs (http, https, ws) the pages so far asked for that are not the app's own."""
    import json

    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert any(u.startswith(server) for u in urls)  # the log did record the page's requests
    network = [u for u in urls if u.startswith(("http:", "https:", "ws:", "wss:"))]
    return [u for u in network if not u.startswith(server)]


def photo(tmp_path: Path) -> Path:
    """A real COCO photo when ../shared has one, else a synthetic scene; 640x480 JPEG."""
    folder = SHARED / "data" / "coco-mini" / "val2017"
    photos = sorted(folder.glob("*.jpg")) if folder.is_dir() else []
    path = tmp_path / "photo.jpg"
    if photos:
        with Image.open(photos[0]) as im:
            ImageOps.fit(ImageOps.exif_transpose(im).convert("RGB"), (640, 480)).save(path)
    else:
        path.write_bytes(encode(scene((640, 480)), "JPEG"))
    return path


def test_upload_shows_caption_beams_and_attention(server, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    image = photo(tmp_path)
    api = httpx.post(
        server + "/api/caption", params={"beam_size": 3}, files={"file": image.open("rb")}
    )
    expected = api.json()

    browser.get(server + "/")
    wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
    assert "small_cnn" in browser.find_element(By.ID, "model-info").text
    # The default model draws shapes: the page says so, and how to serve a photo model.
    assert "Trained on synthetic scenes" in browser.find_element(By.ID, "model-data").text
    notice = browser.find_element(By.ID, "model-notice")
    assert notice.is_displayed() and "coloured shapes" in notice.text
    commands = [c.text for c in notice.find_elements(By.TAG_NAME, "code")]
    assert "python train.py experiment=flickr8k" in commands
    assert any(c.startswith("make app CKPT=") for c in commands)

    # The hidden input behind the drop zone: WebDriver may type a path into a file input directly.
    file_input = browser.find_element(By.ID, "file")
    file_input.send_keys(str(image))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#caption .word"))

    words = browser.find_elements(By.CSS_SELECTOR, "#caption .word")
    assert " ".join(w.text for w in words) == expected["caption"]
    beams = browser.find_elements(By.CSS_SELECTOR, "#beams li")
    assert len(beams) == len(expected["beams"])
    assert f"{expected['beams'][0]['score']:.3f}" in beams[0].text
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tiles .tile canvas")) == len(words)

    # Clicking a beam makes it the caption shown; take the longest, to hover over its words.
    k = max(range(len(beams)), key=lambda i: len(expected["beams"][i]["words"]))
    beams[k].click()
    wait.until(lambda d: "selected" in beams[k].get_attribute("class"))
    words = browser.find_elements(By.CSS_SELECTOR, "#caption .word")
    assert " ".join(w.text for w in words) == expected["beams"][k]["caption"]

    overlay = browser.find_element(By.ID, "overlay")
    pixels = "return arguments[0].toDataURL()"
    assert overlay.get_attribute("data-word") == "0"
    first = browser.execute_script(pixels, overlay)
    assert browser.execute_script(  # the overlay is drawn: some pixel is not transparent
        "const c = arguments[0], d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
        "return d.data.some((v, i) => i % 4 === 3 && v > 0);",
        overlay,
    )
    if len(words) > 1:
        ActionChains(browser).move_to_element(words[1]).perform()  # hover shows that word
        wait.until(lambda d: overlay.get_attribute("data-word") == "1")
        attention = expected["beams"][k]["attention"]
        if attention[0] != attention[1]:  # the same map draws the same pixels
            assert browser.execute_script(pixels, overlay) != first
        assert "active" in words[1].get_attribute("class")
        last = len(words) - 1
        words[last].click()  # a click pins the word ...
        ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
        wait.until(lambda d: overlay.get_attribute("data-word") == str(last))  # ... after hover
        ActionChains(browser).move_to_element(words[1]).perform()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "app.png"
    browser.save_screenshot(str(shot))
    print(f"screenshot: {shot}")
    assert shot.stat().st_size > 10_000

    damaged = tmp_path / "damaged.jpg"
    damaged.write_bytes(damaged_jpeg())
    file_input.send_keys(str(damaged))
    warnings = browser.find_element(By.ID, "warnings")
    wait.until(lambda d: "damaged" in warnings.text)
    assert warnings.is_displayed() and "Corrupt JPEG data" in warnings.text
    assert browser.find_elements(By.CSS_SELECTOR, "#caption .word")  # and still a caption

    bad = tmp_path / "notes.png"
    bad.write_bytes(b"<html>404</html>")
    file_input.send_keys(str(bad))
    error = browser.find_element(By.ID, "error")
    wait.until(lambda d: error.is_displayed())
    assert "notes.png" in error.text and "HTML" in error.text
    assert not warnings.is_displayed()  # the last upload's warnings went with it
    assert outside_requests(browser, server) == []


def test_api_docs_render_offline(server, browser):
    """Swagger UI with no network lists the three endpoints; /redoc leads to it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, 60)
    endpoints = {"/api/caption", "/api/health", "/api/model"}
    browser.get(server + "/docs")

    def paths(d) -> set[str]:
        return {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}

    wait.until(lambda d: endpoints <= paths(d))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "docs.png"))

    browser.get(server + "/redoc")
    wait.until(lambda d: endpoints <= paths(d))
    assert browser.current_url == server + "/docs"
    assert outside_requests(browser, server) == []
