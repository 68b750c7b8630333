"""The review loop in a real browser: review three memes in the queue (keys and mouse), restart the
demo and find the progress kept, export the verdicts, retrain one step from the checkpoint, and load
the new checkpoint in the demo."""
from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest

from dhumor.cli import main

from conftest import ROOT, SMALL
from test_demo_browser import _port, _start_app, _wait, browser  # noqa: F401  (browser is a fixture)

pytestmark = pytest.mark.slow  # headless Chromium


def _open_queue(d, url, reviewer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    d.get(url)
    tab = _wait(lambda: [b for b in d.find_elements(By.CSS_SELECTOR, "button[role=tab]") if "Review queue" in b.text],
                what="queue tab")[0]
    tab.click()
    name = _wait(lambda: d.find_elements(By.CSS_SELECTOR, "#queue-reviewer input, #queue-reviewer textarea"),
                 what="reviewer box")[0]
    name.send_keys(reviewer, Keys.ENTER)
    return _wait(lambda: f"by {reviewer}" in _progress(d) and _progress(d), what="progress")


def _progress(d):
    from selenium.webdriver.common.by import By

    return d.find_element(By.ID, "queue-progress").text


def _current(d):
    return _progress(d).rsplit("now:", 1)[-1].strip()


def _checked(d, task):
    from selenium.webdriver.common.by import By

    return [i.get_attribute("value") for i in d.find_elements(By.CSS_SELECTOR, f"#verdict-{task} input[type=radio]")
            if i.is_selected()]


def test_queue_review_restart_export_retrain(trained, harmeme_fixture, browser, tmp_path):  # noqa: F811
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    results = tmp_path / "scored.jsonl"
    assert main(["score", str(harmeme_fixture), "--checkpoint", str(trained / "export"), "--ocr", "none", "--out",
                 str(results), "--quiet"]) == 0
    log, port = tmp_path / "reviews.sqlite", _port()
    url = f"http://127.0.0.1:{port}/"
    proc = _start_app(trained / "export", log, port, "--ocr", "none", "--queue", str(results))
    d = browser
    try:
        assert "0 of 32 reviewed by ana" in _open_queue(d, url, "ana")
        rows = {json.loads(l)["id"]: json.loads(l) for l in results.read_text().splitlines()}
        first = _current(d)
        uncertain = min(rows.values(), key=lambda r: (abs(r["decision"]["probability"] - r["decision"]["threshold"]),
                                                      r["id"]))
        assert first == uncertain["id"]  # the default order: most uncertain first
        # 1: keyboard only: y (harmful = yes; harmfulness follows), then s (save and next)
        d.find_element(By.ID, "queue-progress").click()  # focus out of any text box
        ActionChains(d).send_keys("y").perform()
        _wait(lambda: _checked(d, "harmful") == ["yes"] and _checked(d, "harmfulness") != ["not harmful"],
              what="y selects harmful")
        ActionChains(d).send_keys("s").perform()
        _wait(lambda: "1 of 32 reviewed" in _progress(d), what="first verdict")
        # 2: the mouse: very harmful, a target, a note
        second = _current(d)
        d.find_element(By.XPATH, "//*[@id='verdict-harmfulness']//label[contains(., 'very harmful')]").click()
        d.find_element(By.XPATH, "//*[@id='verdict-target']//label[contains(., 'community')]").click()
        d.find_element(By.CSS_SELECTOR, "#queue-note textarea, #queue-note input").send_keys("targets a community")
        d.find_element(By.ID, "queue-save").click()
        _wait(lambda: "2 of 32 reviewed" in _progress(d), what="second verdict")
        # 3: n then s
        third = _current(d)
        d.find_element(By.ID, "queue-progress").click()
        ActionChains(d).send_keys("n").perform()
        _wait(lambda: _checked(d, "harmful") == ["no"] and _checked(d, "harmfulness") == ["not harmful"],
              what="n selects not harmful")
        ActionChains(d).send_keys("s").perform()
        _wait(lambda: "3 of 32 reviewed" in _progress(d), what="third verdict")
        shot = Path(os.environ.get("DHUMOR_QUEUE_SCREENSHOT", tmp_path / "review_queue.png"))
        d.execute_script("window.scrollTo(0, 0)")
        d.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
    finally:
        proc.terminate()
        proc.wait(30)
    got = sqlite3.connect(log).execute("SELECT item_id, moderator, labels, note FROM reviews ORDER BY id").fetchall()
    assert [g[0] for g in got] == [first, second, third]
    assert json.loads(got[1][2]) == {"harmful": "yes", "harmfulness": "very harmful", "target": "community"}
    assert got[1][3] == "targets a community" and json.loads(got[2][2])["harmful"] == "no"
    assert {g[1] for g in got} == {"ana"}

    # A restarted demo continues where ana stopped; another reviewer starts at the beginning.
    proc = _start_app(trained / "export", log, port, "--ocr", "none", "--queue", str(results))
    try:
        assert "3 of 32 reviewed by ana" in _open_queue(d, url, "ana")
        assert _current(d) not in {g[0] for g in got}
    finally:
        proc.terminate()
        proc.wait(30)

    # Export, retrain one step from the checkpoint, and load the new checkpoint in the demo.
    reviewed = tmp_path / "reviewed.jsonl"
    assert main(["reviews", "export", "--out", str(reviewed), "--review-log", str(log)]) == 0
    assert len(reviewed.read_text().splitlines()) == 3
    run = tmp_path / "retrain"
    assert main(["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--data.train", str(reviewed),
                 "--data.test", "null", "--model.init_from", str(trained / "export"), "--trainer.max_steps", "1",
                 "--data.val_fraction", "0.34",
                 "--trainer.default_root_dir", str(run), *SMALL]) == 0
    new = next(run.rglob("export"))
    proc = _start_app(new, log, port, "--ocr", "none", "--queue", str(results))
    try:
        d.get(url)
        _wait(lambda: "Checkpoint:" in d.find_element(By.TAG_NAME, "body").text, what="header")
        assert "3 of 32 reviewed by ana" in _open_queue(d, url, "ana")
    finally:
        proc.terminate()
        proc.wait(30)
    assert json.loads((new / "dhumor.json").read_text())["hparams"]["parent_checkpoint"] == str(trained / "export")
