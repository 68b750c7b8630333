"""The signed-in demo in a real browser: a visitor sees only the login page; a reviewer and an admin
signed in at the same time each see only what their role allows (headless Chromium via Selenium).

DHUMOR_DOCS_SCREENSHOTS=docs writes the login and queue screenshots used by docs/deploy-demo.md."""
from __future__ import annotations

import pytest
import os
import subprocess
import sys
from pathlib import Path


from dhumor.cli import main

from test_demo_browser import ROOT, _port, _start_app, _wait, chrome  # noqa: F401

pytestmark = pytest.mark.slow  # headless Chromium

PASSWORDS = {"rita": "rita-reviews-memes", "adam": "adam-admins-memes"}
NOTE = "<img src=x onerror=\"document.title='pwned'\"> **not bold**"


def _driver():
    return chrome("1400,1500")


def _sign_in(d, url, name):
    from selenium.webdriver.common.by import By

    d.get(url)
    user = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "input[name=username], input[type=text]"), what="login")[0]
    user.send_keys(name)
    d.find_element(By.CSS_SELECTOR, "input[type=password]").send_keys(PASSWORDS[name])
    d.find_element(By.XPATH, "//button[contains(., 'Login')]").click()
    _wait(lambda: f"Signed in as {name}" in d.find_element(By.TAG_NAME, "body").text, what=f"{name} signed in")


def _text(d, elem_id) -> str:
    from selenium.webdriver.common.by import By

    return " ".join(e.text for e in d.find_elements(By.ID, elem_id))


def _shown(d, elem_id) -> bool:
    from selenium.webdriver.common.by import By

    return any(e.is_displayed() for e in d.find_elements(By.ID, elem_id))


def _tab(d, name):
    from selenium.webdriver.common.by import By

    _wait(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if name in b.text],
          what=f"{name} tab")[0].click()


def test_visitor_reviewer_and_admin_each_see_what_their_role_allows(trained, harmeme_fixture, tmp_path):
    from selenium.webdriver.common.by import By

    root = tmp_path / "queues"
    root.mkdir()
    import shutil

    shutil.copytree(harmeme_fixture.parent, root / "harmeme")  # the images a queue shows lie under its root
    assert main(["score", str(root / "harmeme" / harmeme_fixture.name), "--checkpoint", str(trained / "export"), "--ocr", "none", "--out",
                 str(root / "scored.jsonl"), "--quiet"]) == 0
    users = tmp_path / "users.json"
    for name, role in (("rita", "reviewer"), ("adam", "admin")):
        r = subprocess.run([sys.executable, "-m", "dhumor.cli", "users", "add", str(users), name, "--role", role,
                            "--password-stdin"], input=PASSWORDS[name] + "\n", capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    port = _port()
    url = f"http://127.0.0.1:{port}/"
    proc = _start_app(trained / "export", tmp_path / "reviews.sqlite", port, "--ocr", "none", "--auth", str(users),
                      "--queue-root", str(root))
    shots = Path(os.environ.get("DHUMOR_DOCS_SCREENSHOTS", tmp_path))
    visitor, rita, adam = _driver(), _driver(), _driver()
    try:
        # A visitor: the login form and nothing of the app.
        visitor.get(url)
        _wait(lambda: visitor.find_elements(By.CSS_SELECTOR, "input[type=password]"), what="login form")
        body = visitor.find_element(By.TAG_NAME, "body").text
        assert "Checkpoint" not in body and "Record verdict" not in body and "Review queue" not in body
        visitor.save_screenshot(str(shots / "demo-login.png"))
        visitor.get(url + "gradio_api/file=/etc/passwd")
        assert "root:" not in visitor.page_source

        # Both signed in at once.
        _sign_in(rita, url, "rita")
        _sign_in(adam, url, "adam")
        assert "(reviewer)" in _text(rita, "whoami")
        assert "(admin)" in _text(adam, "whoami")
        # No name box when signed in (the verdict carries the user); export only for the admin.
        _wait(lambda: _shown(adam, "export"), what="admin's export button")
        assert not _shown(rita, "export") and not _shown(rita, "moderator") and not _shown(adam, "moderator")

        # rita scores the shipped example and records a verdict with markup in the note.
        rita.find_element(By.CSS_SELECTOR, "#meme-input input[type=file]").send_keys(
            str(ROOT / "dhumor" / "assets" / "examples" / "horse.jpg"))
        _wait(lambda: "Decision" in _text(rita, "decision"), what="rita's decision")
        rita.find_element(By.CSS_SELECTOR, "#note textarea, #note input").send_keys(NOTE)
        rita.find_element(By.ID, "record").click()
        _wait(lambda: "Recorded review #" in _text(rita, "review-status"), what="rita's verdict")
        # The admin sees rita's note as text (no image element, no script ran).
        adam.refresh()
        _wait(lambda: "not bold" in _text(adam, "reviews"), what="rita's note in adam's table")
        assert not adam.find_elements(By.CSS_SELECTOR, "#reviews img") and adam.title != "pwned"
        assert "<img" in _text(adam, "reviews")  # shown, not rendered

        # The queue: only the admin can open one from the root's list; then rita reviews it.
        _tab(rita, "Review queue")
        _wait(lambda: "No queue is open yet" in _text(rita, "queue-progress"), what="no queue")
        assert not _shown(rita, "queue-root") and not _shown(rita, "queue-export")
        _tab(adam, "Review queue")
        _wait(lambda: _shown(adam, "queue-root"), what="admin's queue-root list")
        adam.find_element(By.CSS_SELECTOR, "#queue-root input").click()
        _wait(lambda: [o for o in adam.find_elements(By.CSS_SELECTOR, "ul[role=listbox] li, .options li")
                       if "scored.jsonl" in o.text], what="the list")[0].click()
        adam.find_element(By.ID, "queue-root-open").click()
        _wait(lambda: "0 of 32 reviewed by adam" in _text(adam, "queue-progress"),
              what="admin's queue")
        assert _shown(adam, "queue-export")
        adam.execute_script("window.scrollTo(0, 0)")
        adam.save_screenshot(str(shots / "demo-queue.png"))
        rita.refresh()
        _tab(rita, "Review queue")
        _wait(lambda: "0 of 32 reviewed by rita" in _text(rita, "queue-progress"),
              what="rita's queue")
        assert not _shown(rita, "queue-root") and not _shown(rita, "queue-export")
        assert rita.find_elements(By.CSS_SELECTOR, "#queue-image img")  # the meme is shown
        rita.find_element(By.ID, "queue-save").click()
        _wait(lambda: "1 of 32 reviewed by rita" in _text(rita, "queue-progress"),
              what="rita's queue verdict")
    finally:
        for d in (visitor, rita, adam):
            d.quit()
        proc.terminate()
        proc.wait(30)
    assert (shots / "demo-login.png").stat().st_size > 5_000 and (shots / "demo-queue.png").stat().st_size > 10_000
