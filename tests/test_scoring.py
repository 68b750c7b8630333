"""dhumor score: OCR built in, every bad file reported, resumable after SIGKILL, shards, CSV."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from badimages import write_all
from dhumor.cli import main
from dhumor.inference.results_file import ResultsFile
from dhumor.schema import HARMEME

ROOT = Path(__file__).resolve().parent.parent


def _rows(path: Path) -> list[dict]:
    return [json.loads(l) for l in path.read_text().splitlines()]


def _distinct_memes(src: Path, n: int) -> list[str]:
    """``n`` images that differ in content, so that every one costs a real feature extraction and a signal
    lands mid-batch (copies of one file hit the feature cache after the first and finish in milliseconds)."""
    from PIL import Image

    src.mkdir()
    base = Image.open(ROOT / "examples" / "horse.jpg").convert("RGB")
    names = []
    for i in range(n):
        img = base.copy()
        img.paste((i * 37 % 256, i * 91 % 256, i * 13 % 256), (0, 0, 24, 24))
        names.append(f"m{i:03d}.jpg")
        img.save(src / names[-1], quality=90)
    return names


def _score(ckpt, src, out, *extra):
    return main(["score", str(src), "--checkpoint", str(ckpt), "--out", str(out), "--quiet", *extra])


def test_score_examples_with_rapidocr(trained, tmp_path):
    src = tmp_path / "ex"
    src.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(ROOT / "examples" / name, src / name)
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out, "--ocr", "rapidocr") == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert set(rows) == {"chelsea.jpg", "coffee.jpg"}
    assert "VET" in rows["chelsea.jpg"]["caption"] and rows["chelsea.jpg"]["caption_source"] == "rapidocr"
    r = rows["coffee.jpg"]
    assert r["error"] is None and len(r["sha256"]) == 64
    assert abs(sum(r["tasks"]["harmfulness"]["probs"].values()) - 1) < 1e-4
    assert {"decode", "ocr", "features", "model"} <= set(r["timings"])


def test_bad_inputs_never_stop_the_batch(trained, tmp_path, capsys):
    src = tmp_path / "bad"
    expected = write_all(src)
    shutil.copy(ROOT / "examples" / "horse.jpg", src / "good.jpg")
    expected["good.jpg"] = ("ok", None)
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out, "--ocr", "none", "--batch-size", "4") == 3  # some rows are errors
    rows = {r["id"]: r for r in _rows(out)}
    files = {k for k in expected if (src / k).is_file() or (src / k).is_symlink()}
    assert set(rows) == files  # one row per file, the directory named *.jpg is not a file
    for name in files:
        kind, detail = expected[name]
        if kind == "ok":
            assert rows[name]["error"] is None and rows[name]["tasks"]["harmful"]["label"] in ("no", "yes"), name
        else:
            assert detail in rows[name]["error"], (name, rows[name]["error"])
            assert rows[name]["tasks"] is None
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["failed"] == sum(1 for n in files if expected[n][0] == "error")
    assert summary["scored"] == sum(1 for n in files if expected[n][0] == "ok")


def test_rerun_does_nothing_and_retry_errors_rescored(trained, tmp_path, capsys):
    src = tmp_path / "s"
    src.mkdir()
    shutil.copy(ROOT / "examples" / "horse.jpg", src / "a.jpg")
    (src / "b.jpg").write_bytes(b"")
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out, "--ocr", "none") == 3
    capsys.readouterr()
    assert _score(trained / "export", src, out, "--ocr", "none") == 3  # the output still holds an error row
    assert "nothing to do" in capsys.readouterr().err
    shutil.copy(ROOT / "examples" / "horse.jpg", src / "b.jpg")  # the user fixes the broken file
    assert _score(trained / "export", src, out, "--ocr", "none", "--retry-errors") == 0
    rows = {r["id"]: r for r in _rows(out)}
    assert len(_rows(out)) == 2 and rows["b.jpg"]["error"] is None


def test_torn_last_line_is_cut_and_recomputed(tmp_path):
    out = tmp_path / "r.jsonl"
    # a results row has the keys every score row has; anything else is refused before a byte is cut
    out.write_text('{"id": "a", "sha256": null, "tasks": null, "decision": null, "error": null}\n{"id": "b", "err')
    rf = ResultsFile(out, HARMEME)
    assert rf.repair() == len('{"id": "b", "err')
    assert rf.done_ids() == {"a": False}


def test_csv_output_resumes_and_keeps_one_line_per_row(trained, tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    for name in ("chelsea.jpg", "rocket.jpg", "horse.jpg"):
        shutil.copy(ROOT / "examples" / name, src / name)
    out = tmp_path / "r.csv"
    assert _score(trained / "export", src, out, "--ocr", "rapidocr", "--batch-size", "1") == 0
    lines = out.read_text().splitlines()
    assert len(lines) == 4 and lines[0].startswith("id,path,sha256,caption")
    import csv

    rows = list(csv.DictReader(out.open()))
    assert "\\n" in rows[0]["caption"]  # multi-line OCR text stays on one physical line
    with open(out, "a") as fh:
        fh.write("horse.jpg,partial")  # a torn row, as after SIGKILL
    lines_before = len(out.read_text().splitlines())
    assert _score(trained / "export", src, out, "--ocr", "rapidocr") == 0
    assert len(out.read_text().splitlines()) == lines_before - 1  # the torn row was cut, nothing re-added


def test_shards_partition_and_merge(trained, tmp_path, capsys):
    src = tmp_path / "s"
    src.mkdir()
    for i in range(10):
        shutil.copy(ROOT / "examples" / "horse.jpg", src / f"m{i}.jpg")
    outs = []
    for i in range(2):
        outs.append(tmp_path / f"shard{i}.jsonl")
        assert _score(trained / "export", src, outs[-1], "--ocr", "none", "--shard", f"{i}/2") == 0
    ids = [set(r["id"] for r in _rows(o)) for o in outs]
    assert ids[0] and ids[1] and not ids[0] & ids[1] and ids[0] | ids[1] == {f"m{i}.jpg" for i in range(10)}
    merged = tmp_path / "all.jsonl"
    assert main(["merge", *map(str, outs), "--out", str(merged)]) == 0
    assert len(_rows(merged)) == 10
    assert main(["merge", str(outs[0]), str(outs[0]), "--out", str(tmp_path / "again.jsonl")]) == 2
    assert "shards overlap" in capsys.readouterr().err
    # merge writes a new file: never over an existing one (notes, a manifest, an earlier merge) or an input
    notes = tmp_path / "notes.jsonl"
    notes.write_text("my precious notes\n")
    before = merged.read_bytes()
    assert main(["merge", str(outs[0]), "--out", str(notes)]) == 2
    assert main(["merge", str(outs[0]), "--out", str(merged)]) == 2
    assert main(["merge", str(outs[0]), str(outs[1]), "--out", str(outs[1])]) == 2
    assert notes.read_text() == "my precious notes\n" and merged.read_bytes() == before
    assert "exists" in capsys.readouterr().err
    assert main(["score", str(src), "--checkpoint", str(trained / "export"), "--out", str(merged), "--shard", "2/2"]) == 2


def _start(ckpt, src, out, *extra):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "dhumor.cli", "score", str(src), "--checkpoint", str(ckpt),
                             "--out", str(out), "--ocr", "none", "--batch-size", "1", "--quiet", *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=_default_sigint)


def _default_sigint():
    # A test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python then
    # installs no KeyboardInterrupt handler: the child must get the disposition an operator's terminal gives.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_rows(out: Path, n: int, proc, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= n:
            return True
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_and_resume_exactly_once(trained, tmp_path):
    src = tmp_path / "s"
    n = 60
    names = _distinct_memes(src, n)
    out = tmp_path / "r.jsonl"
    rng = random.Random(0)
    kills = 0
    for k in range(3):
        p = _start(trained / "export", src, out)
        target = (k + 1) * n // 4
        if _wait_rows(out, target, p):
            time.sleep(rng.uniform(0, 0.3))  # land anywhere: between rows or in the middle of a write
            p.send_signal(signal.SIGKILL)
            kills += 1
        p.wait(60)
    assert kills == 3
    p = _start(trained / "export", src, out)
    assert p.wait(300) == 0, p.stderr.read().decode()[-2000:]
    rows = _rows(out)
    assert sorted(r["id"] for r in rows) == names  # exactly once each
    assert all(r["error"] is None for r in rows)


def test_ctrl_c_stops_cleanly(trained, tmp_path):
    src = tmp_path / "s"
    n = 200
    _distinct_memes(src, n)
    out = tmp_path / "r.jsonl"
    p = _start(trained / "export", src, out)
    assert _wait_rows(out, 3, p)
    p.send_signal(signal.SIGINT)
    assert p.wait(60) == 130
    assert "Run the same command again" in p.stderr.read().decode()
    rows = _rows(out)  # every line is a complete row
    assert 3 <= len(rows) < n and len({r["id"] for r in rows}) == len(rows)
