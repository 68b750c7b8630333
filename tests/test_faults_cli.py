"""Issue 11 end to end: the real `dhumor score` / `explain` on real faults, nothing lost, nothing twice."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import faultkit
from dhumor.cli import main
from dhumor.inference.results_file import ResultsFile
from dhumor.schema import HARMEME

ROOT = Path(__file__).resolve().parent.parent


def _score(ckpt, src, out, *extra):
    return main(["score", os.fsdecode(src), "--checkpoint", str(ckpt), "--out", str(out), "--quiet", "--ocr", "none",
                 *extra])


def _ids(out: Path) -> list[str]:
    return [r["id"] for r in ResultsFile(out, HARMEME).rows()]


def _images(folder: Path, n: int, start: int = 0) -> list[str]:
    for i in range(start, start + n):
        faultkit.write_bytes_at(folder / f"m{i:03d}.png", faultkit.png_bytes(seed=i))
    return [f"m{i:03d}.png" for i in range(start, start + n)]


def _summary(err: str) -> dict:
    return json.loads(next(l for l in reversed(err.splitlines()) if l.startswith("{")))


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    yield d
    faultkit.remove_tree(d)  # deep trees: pytest's own clean-up would hit the recursion limit


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_every_file_gets_exactly_one_row_under_its_exact_name(trained, src, tmp_path, suffix, capsys):
    expected = {n: "ok" for n in _images(src, 2)}
    for i, name in enumerate(faultkit.odd_names()):
        faultkit.write_bytes_at(src / name, faultkit.png_bytes(seed=10 + i))
        expected[name] = "ok"
    faultkit.write_bytes_at(src / "vector.svg", b'<svg xmlns="http://www.w3.org/2000/svg"/>')
    faultkit.write_bytes_at(src / "notes.txt", b"not a meme")
    expected.update({"vector.svg": "SVG is a vector format", "notes.txt": "not an image (a .txt file)"})
    from PIL import Image
    import io

    Image.open(io.BytesIO(faultkit.png_bytes(seed=3))).save(src / "icon.ico")
    expected["icon.ico"] = "ok"
    for p in (faultkit.make_deep_tree(src / "deep", 1200), faultkit.make_long_path(src / "long")):
        expected[p.relative_to(src).as_posix()] = "ok"
    out = tmp_path / f"r{suffix}"
    assert _score(trained / "export", src, out) in (0, 3)
    rows = ResultsFile(out, HARMEME).rows()
    assert sorted(r["id"] for r in rows) == sorted(expected)  # every file once, names exact
    for r in rows:
        want = expected[r["id"]]
        if want == "ok":
            assert not r["error"], (r["id"], r["error"])
        else:
            assert want in r["error"], (r["id"], r["error"])
    size = out.stat().st_size
    capsys.readouterr()
    for _ in range(2):  # reruns find every row done: nothing added, nothing changed
        assert _score(trained / "export", src, out) in (0, 3)
        assert "nothing to do" in capsys.readouterr().err
    assert out.stat().st_size == size


def test_two_real_processes_on_one_output(trained, src, tmp_path):
    expected = _images(src, 40)
    out = tmp_path / "r.csv"
    cmd = [sys.executable, "-m", "dhumor.cli", "score", str(src), "--checkpoint", str(trained / "export"),
           "--out", str(out), "--ocr", "none", "--quiet", "--batch-size", "4"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes) == [0, 2], errs
    refused = errs[codes.index(2)].strip().splitlines()
    assert len(refused) == 1 and "is already writing this file" in refused[0] and str(out) in refused[0]
    assert sorted(_ids(out)) == expected  # each exactly once
    assert not Path(str(out) + ".lock").exists()


def test_torn_middle_csv_row_stops_the_rerun_with_its_line(trained, src, tmp_path, capsys):
    _images(src, 5)
    out = tmp_path / "r.csv"
    assert _score(trained / "export", src, out) == 0
    lines = out.read_bytes().split(b"\n")
    lines[2] = lines[2][:50]
    out.write_bytes(b"\n".join(lines))
    before = out.read_bytes()
    capsys.readouterr()
    assert _score(trained / "export", src, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "r.csv:3: damaged row" in err[0]
    assert out.read_bytes() == before


@pytest.mark.parametrize("make, message", [
    (lambda d: (d / "out.jsonl").mkdir() or d / "out.jsonl", "is a folder"),
    (lambda d: d / "results", "has no suffix"),
    (lambda d: d / "results.txt", "ends in '.txt'"),
])
def test_bad_out_is_one_line_exit_2(trained, src, tmp_path, capsys, make, message):
    _images(src, 1)
    out = make(tmp_path)
    assert _score(trained / "export", src, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(out) in err[0]


def test_broken_cache_is_reported_once_and_scoring_goes_on(trained, src, tmp_path, capsys):
    expected = _images(src, 4, start=50)
    cache = tmp_path / "garbage.sqlite"
    cache.write_bytes(os.urandom(4096))
    out = tmp_path / "r.jsonl"
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep(logging.WARNING)
    logging.getLogger("dhumor").addHandler(h)
    try:
        assert _score(trained / "export", src, out, "--cache", str(cache)) == 0
    finally:
        logging.getLogger("dhumor").removeHandler(h)
    assert sorted(_ids(out)) == expected and all(not r["error"] for r in ResultsFile(out, HARMEME).rows())
    warned = [m for m in seen if "stage cache" in m]
    assert len(warned) == 1 and str(cache) in warned[0] and "file is not a database" in warned[0]


def test_damaged_checkpoint_is_one_line_naming_the_field(trained, src, tmp_path, capsys):
    import shutil

    _images(src, 1)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(trained / "export", ckpt)
    meta = json.loads((ckpt / "dhumor.json").read_text())
    meta["hparams"].pop("streams")
    (ckpt / "dhumor.json").write_text(json.dumps(meta))
    assert _score(ckpt, src, tmp_path / "r.jsonl") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'hparams.streams': Field required" in err[0]
    assert not (tmp_path / "r.jsonl").exists()


def test_failed_explanations_are_visible_in_csv_and_counted(trained, src, tmp_path, capsys):
    expected = _images(src, 3, start=60)
    out = tmp_path / "r.csv"
    with faultkit.RefusingServer() as url:
        rc = _score(trained / "export", src, out, "--explain", "openai", "--explain-model", "m", "--base-url", url,
                    "--iterations", "1")
    assert rc == 3  # every row written and decided, but the explanations asked for are missing
    rows = ResultsFile(out, HARMEME).rows()
    assert sorted(r["id"] for r in rows) == expected
    assert all("HTTP 403" in r["explanation_error"] and not r["error"] for r in rows)
    assert _summary(capsys.readouterr().err)["explanation_failed"] == 3


def test_explain_keeps_a_name_that_is_not_utf8(src, tmp_path):
    bad = os.fsdecode(b"img\xff.png")
    expected = _images(src, 2, start=70) + [bad]
    faultkit.write_bytes_at(src / bad, faultkit.png_bytes(seed=71))
    out = tmp_path / "e.jsonl"
    with faultkit.RefusingServer() as url:
        assert main(["explain", str(src), "--out", str(out), "--explain", "openai", "--explain-model", "m", "--base-url", url,
                     "--ocr", "none", "--iterations", "1", "--quiet"]) in (0, 3)
    rows = [json.loads(l) for l in out.read_bytes().split(b"\n")[:-1]]
    assert sorted(r["id"] for r in rows) == sorted(expected)
    assert all(r["status"] == "failed" and "403" in r["error"] for r in rows)


# ================================================================ issue 28: nothing damaged, nothing mixed
def _err(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def test_rows_record_provenance_and_a_rerun_with_other_settings_is_refused(trained, src, tmp_path, capsys):
    from dhumor.model.checkpoint import checkpoint_digest

    expected = _images(src, 3, start=100)
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out) == 0
    rows = ResultsFile(out, HARMEME).rows()
    prov = rows[0]["provenance"]
    assert prov["checkpoint"] == checkpoint_digest(trained / "export") and prov["ocr"] == "none"
    assert prov["explainer"] is None and 0 <= prov["threshold"] <= 1
    assert all(r["provenance"] == prov for r in rows)
    _images(src, 1, start=103)  # a new meme: the rerun has work to do, and must not do it with other settings
    before = out.read_bytes()
    capsys.readouterr()
    assert _score(trained / "export", src, out, "--decision-threshold", "0.123") == 2
    err = _err(capsys)
    assert len(err) == 1 and "threshold 0.123" in err[0] and f"threshold {prov['threshold']}" in err[0], err
    assert "--rescore" in err[0] and out.read_bytes() == before
    ckpts = sorted((trained / "checkpoints").glob("*.ckpt"))
    assert _score(ckpts[0], src, out) == 2  # another checkpoint: refused, naming both digests
    err = _err(capsys)
    assert prov["checkpoint"][:12] in err[0] and checkpoint_digest(ckpts[0])[:12] in err[0], err
    assert out.read_bytes() == before
    # --rescore: everything again, into the same file, with the new settings; one row per meme
    assert _score(trained / "export", src, out, "--decision-threshold", "0.123", "--rescore") == 0
    rows = ResultsFile(out, HARMEME).rows()
    assert sorted(r["id"] for r in rows) == sorted(expected + ["m103.png"])
    assert {r["provenance"]["threshold"] for r in rows} == {0.123}


def test_rows_of_an_older_dhumor_are_read_but_not_resumed_into(trained, src, tmp_path, capsys):
    _images(src, 2, start=110)
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out) == 0
    legacy = [json.loads(l) for l in out.read_text().split("\n") if l]
    for r in legacy:
        r.pop("provenance")
    out.write_text("".join(json.dumps(r) + "\n" for r in legacy))
    assert len(ResultsFile(out, HARMEME).rows()) == 2  # still readable
    capsys.readouterr()
    assert _score(trained / "export", src, out) == 2
    err = _err(capsys)
    assert "older dhumor" in err[0] and "--rescore" in err[0], err
    assert _score(trained / "export", src, out, "--rescore") == 0
    assert all(r.get("provenance") for r in ResultsFile(out, HARMEME).rows())


def test_merge_refuses_to_mix_settings(trained, src, tmp_path):
    from dhumor.errors import DataError
    from dhumor.inference.merge import merge_results

    _images(src, 4, start=120)
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert _score(trained / "export", src, a, "--shard", "0/2") == 0
    assert _score(trained / "export", src, b, "--shard", "1/2", "--decision-threshold", "0.9") == 0
    with pytest.raises(DataError, match="was scored with .*threshold 0.9"):
        merge_results([a, b], tmp_path / "all.jsonl")
    assert not (tmp_path / "all.jsonl").exists()


def _strip(folder: Path) -> str:
    from PIL import Image

    Image.new("RGB", (20000, 20), "white").save(folder / "strip.png")
    return "strip.png"


def test_ocr_command_turns_one_inputs_failure_into_its_row(src, capsys):
    pytest.importorskip("rapidocr")
    names = _images(src, 2, start=130) + [_strip(src)]
    faultkit.write_bytes_at(src / "notes.txt", b"not an image")
    assert main(["ocr", str(src), "--ocr", "rapidocr", "--quiet"]) == 3  # the batch finished; some rows are errors
    rows = {r["id"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert set(rows) == set(names) | {"notes.txt"}
    assert rows["strip.png"]["error_kind"] == "permanent" and "ResizeImgError" in rows["strip.png"]["error"]
    assert rows["notes.txt"]["error_kind"] == "permanent"
    assert all("text" in rows[n] for n in names if n != "strip.png")


def test_score_marks_an_ocr_resize_failure_permanent_and_does_not_retry_it(trained, src, tmp_path, capsys):
    pytest.importorskip("rapidocr")
    _images(src, 1, start=140)
    _strip(src)
    out = tmp_path / "r.jsonl"
    assert _score(trained / "export", src, out, "--ocr", "rapidocr") == 3
    row = next(r for r in ResultsFile(out, HARMEME).rows() if r["id"] == "strip.png")
    assert row["error_kind"] == "permanent" and "ResizeImgError" in row["error"]
    size = out.stat().st_size
    capsys.readouterr()
    assert _score(trained / "export", src, out, "--ocr", "rapidocr") == 3
    assert "nothing to do" in capsys.readouterr().err and out.stat().st_size == size  # not retried


def test_a_bug_in_the_pipeline_is_exit_1_not_a_row(trained, src, tmp_path, monkeypatch, capsys):
    _images(src, 2, start=150)
    out = tmp_path / "r.jsonl"

    def broken(path, *a, **k):
        raise TypeError("a bug in dhumor")  # not the file's fault: must not become a "transient" row

    monkeypatch.setattr("dhumor.inference.prepare.load_image_with_digest", broken)
    assert _score(trained / "export", src, out) == 1
    assert "internal error: TypeError: a bug in dhumor" in capsys.readouterr().err
    assert not out.exists() or not ResultsFile(out, HARMEME).rows()


def test_other_ckpt_of_the_run_decides_uncalibrated_with_a_warning(trained, src, tmp_path, capsys):
    import shutil

    from dhumor.model.checkpoint import file_sha256, read_checkpoint

    sel = json.loads((trained / "export" / "dhumor.json").read_text())["metrics"]["selection"]
    best = trained / "checkpoints" / sel["checkpoint"]
    assert sel["checkpoint_sha256"] == file_sha256(best)  # the export names the file it was fitted for
    assert read_checkpoint(best)[0].get("calibration")
    other = trained / "checkpoints" / "copy-of-another.ckpt"
    try:
        shutil.copy(best, other)
        other.write_bytes(other.read_bytes())  # same weights, but not the file the calibration was fitted for
        with open(other, "ab") as fh:
            fh.write(b"\0")
        meta = read_checkpoint(other)[0]
        assert "calibration" not in meta and "thresholds" not in meta
    finally:
        other.unlink(missing_ok=True)


def test_explain_turns_an_ocr_failure_into_that_memes_row(src, tmp_path):
    pytest.importorskip("rapidocr")
    names = _images(src, 1, start=160) + [_strip(src)]
    out = tmp_path / "e.jsonl"
    with faultkit.RefusingServer() as url:
        assert main(["explain", str(src), "--out", str(out), "--explain", "openai", "--explain-model", "m",
                     "--base-url", url, "--ocr", "rapidocr", "--iterations", "1", "--quiet"]) == 3
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == set(names)
    assert rows["strip.png"]["status"] == "failed" and "ResizeImgError" in rows["strip.png"]["error"]
    assert rows["strip.png"]["error_kind"] == "permanent"
