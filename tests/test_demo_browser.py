"""The Gradio demo in a real browser (Debian's headless Chromium driven by Selenium)."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

pytestmark = pytest.mark.slow  # headless Chromium

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
    # CI installs Chromium and sets DHUMOR_REQUIRE_BROWSER, so there a missing browser fails instead.
    if os.environ.get("DHUMOR_REQUIRE_BROWSER"):
        raise RuntimeError("Chromium is required: apt-get install chromium chromium-driver")
    pytest.skip("Chromium not installed (apt-get install chromium chromium-driver)", allow_module_level=True)


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_app(ckpt, review_log, port, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app" / "app.py"), "--checkpoint", str(ckpt), "--port",
                             str(port), "--review-log", str(review_log), *extra], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=open(Path(review_log).with_suffix(".log"), "w"))
    for _ in range(600):
        if proc.poll() is not None:
            pytest.fail(f"demo exited: {Path(review_log).with_suffix('.log').read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    pytest.fail("demo did not start")


@pytest.fixture(scope="module")
def app(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    port = _port()
    # DHUMOR_DEMO_CHECKPOINT=checkpoints/harmeme-tcrnet shows the shipped model (used for the README screenshot).
    ckpt = os.environ.get("DHUMOR_DEMO_CHECKPOINT", trained / "export")
    proc = _start_app(ckpt, tmp / "reviews.sqlite", port, "--max-file-mb", "0.2")
    yield {"url": f"http://127.0.0.1:{port}/", "log": tmp / "reviews.sqlite", "proc": proc, "ckpt": ckpt,
           "tmp": tmp}
    proc.terminate()
    proc.wait(30)


def chrome(window: str = "1400,1700"):
    """Debian's headless Chromium under Selenium, with the flags this machine needs."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    o = Options()
    o.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
              "--disable-dev-shm-usage", f"--window-size={window}"):
        o.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=o)


@pytest.fixture
def browser():
    d = chrome()
    yield d
    d.quit()


def _wait(fn, timeout=120, what=""):
    from selenium.common.exceptions import StaleElementReferenceException

    t0 = time.time()
    while time.time() - t0 < timeout:
        try:
            v = fn()
        except StaleElementReferenceException:  # the page re-rendered between finding and reading: look again
            v = None
        if v:
            return v
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _upload(d, url, path):
    from selenium.webdriver.common.by import By

    d.get(url)
    inp = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#meme-input input[type=file]"), what="upload input")[0]
    inp.send_keys(str(path))


def test_upload_decide_review_in_a_real_browser(app, browser, tmp_path):
    from selenium.webdriver.common.by import By

    from dhumor.data.synthetic import render_meme, sample_image
    from dhumor.images import sha256_bytes

    meme = tmp_path / "generated meme.jpg"
    render_meme(sample_image("chelsea"), "when the vet says", "it's just a small procedure").save(meme, quality=90)
    d = browser
    _upload(d, app["url"], meme)
    decision = _wait(lambda: "Decision" in d.find_element(By.ID, "decision").text and
                     d.find_element(By.ID, "decision").text, what="decision")
    import json

    meta = json.loads((Path(app["ckpt"]) / "dhumor.json").read_text())
    balanced = (meta.get("thresholds") or {}).get("balanced", 0.5)  # the checkpoint's preset, else 0.5
    assert "harmful probability" in decision and f"threshold {balanced:.2f}" in decision
    caption = d.find_element(By.CSS_SELECTOR, "#caption textarea").get_attribute("value")
    assert "VET" in caption.upper()  # rapidocr read the rendered caption
    harmful = d.find_element(By.ID, "label-harmful").text
    assert "no" in harmful and "yes" in harmful and "%" in harmful
    assert "harmfulness" in d.find_element(By.ID, "label-harmfulness").text
    assert "No explanation backend is configured" in d.find_element(By.ID, "explanation").text
    # The moderator overrides the decision with a note.
    d.find_element(By.XPATH, "//*[@id='verdict']//label[contains(., 'override: flag')]").click()
    d.find_element(By.CSS_SELECTOR, "#note textarea, #note input").send_keys("mocks a pet's surgery")
    d.find_element(By.ID, "record").click()
    status = _wait(lambda: "Recorded review #" in d.find_element(By.ID, "review-status").text and
                   d.find_element(By.ID, "review-status").text, what="review recorded")
    shot = Path(os.environ.get("DHUMOR_SCREENSHOT", tmp_path / "demo.png"))
    d.execute_script("window.scrollTo(0, 0)")
    d.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    rows = sqlite3.connect(app["log"]).execute(
        "SELECT sha256, verdict, final_flagged, note, filename FROM reviews").fetchall()
    assert (sha256_bytes(meme.read_bytes()), "override: flag", 1, "mocks a pet's surgery") == rows[-1][:4]
    assert status.startswith("Recorded review #")


def test_bad_upload_gets_a_clear_message(app, browser, tmp_path):
    from selenium.webdriver.common.by import By

    fake = tmp_path / "not_really.jpg"
    fake.write_text("<html>this is not an image</html>")
    _upload(browser, app["url"], fake)
    status = _wait(lambda: browser.find_element(By.ID, "status").text, what="status")
    assert "Cannot use this file: not a recognised image format" in status
    assert "Traceback" not in browser.page_source


def test_upload_size_cap(app, tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(400_000))
    r = requests.post(app["url"] + "gradio_api/upload", files={"files": ("big.png", big.open("rb"))}, timeout=30)
    assert r.status_code == 413


def test_concurrent_users_are_queued(app):
    from gradio_client import Client, handle_file

    client = Client(app["url"], verbose=False)
    files = [ROOT / "examples" / n for n in ("horse.jpg", "rocket.jpg", "coffee.jpg", "camera.jpg")]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda f: client.predict(handle_file(str(f)), 0.5, api_name="/analyze"), files))
    decisions = [[x for x in r if isinstance(x, str) and x.startswith("## Decision")] for r in results]
    assert all(len(d) == 1 for d in decisions), results  # every user got an answer
    assert requests.get(app["url"], timeout=5).status_code == 200  # and the app is still up


def test_review_log_survives_a_killed_app(trained, tmp_path):
    from gradio_client import Client, handle_file

    port, log = _port(), tmp_path / "r.sqlite"
    proc = _start_app(trained / "export", log, port, "--ocr", "none")
    client = Client(f"http://127.0.0.1:{port}/", verbose=False)
    client.predict(handle_file(str(ROOT / "examples" / "horse.jpg")), 0.5, api_name="/analyze")
    status = client.predict(0.5, "balanced", "confirm", "ok", "mod-1", api_name="/record")
    assert "Recorded review #1" in status[0]
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert sqlite3.connect(log).execute("SELECT verdict, moderator FROM reviews").fetchall() == [("confirm", "mod-1")]
