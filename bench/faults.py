"""Replay every fault of issues 11 and 28 against the real `dhumor` command and print the table: case, before, after.

Each case makes its fault for real (a file name with an invalid UTF-8 byte, two `dhumor score`
processes on one output, a tmpfs mounted read-only or filled up, an immutable file, a tree 1,200
folders deep, a path past PATH_MAX, a local HTTP server that refuses every explanation) and runs
`dhumor score` (or `explain`) as a subprocess. "before" is what issue 11 measured; "after" is measured
now. Totals: tried, handled, rows lost (ids expected but missing), rows duplicated (ids written twice),
files damaged (a file that is not the run's own output, changed by it: notes, a manifest, a results
file whose settings differ). Issue 28 added: foreign and symlinked --out, the input manifest as --out,
line separators and a BOM in manifests, reruns with other settings, OCR on a 20000x20 strip, damaged
weights and hyper-parameters, a missing threshold, bad flags, a cache locked by another process, a
redirect loop from the explanation server.

    python bench/faults.py [--checkpoint DIR] [--json FILE, default bench/results/faults.json] [--only SUBSTRING]

Needs root for the mount and chattr cases (they are reported as skipped otherwise). About 3 minutes
on a 2-core CPU (each case starts a fresh `dhumor` process).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from record import Recorder, refuse_subset_over_default, results_path  # noqa: E402

import faultkit  # noqa: E402  (tests/faultkit.py: the fault makers the tests use too)

from dhumor.inference.results_file import ResultsFile  # noqa: E402
from dhumor.schema import HARMEME, TaskSchema  # noqa: E402

SCHEMA = HARMEME  # the scoring checkpoint's tasks (they name the CSV columns); set in main()


@dataclass
class Outcome:
    case: str
    before: str
    after: str
    handled: bool | None  # None: skipped (this machine cannot make the fault)
    rows_lost: int = 0
    rows_duplicated: int = 0
    files_damaged: int = 0  # files that are not the run's own output, changed by it


CASES: list[tuple[str, str, Callable]] = []


def case(name: str, before: str):
    def register(fn):
        CASES.append((name, before, fn))
        return fn
    return register


class Bench:
    """Shared state: a scratch folder, a private stage cache, the checkpoint, the `dhumor` command."""

    def __init__(self, scratch: Path, checkpoint: str | None):
        self.scratch, self.checkpoint = scratch, checkpoint
        self.cache = scratch / "cache.sqlite"
        self._n = 0

    def dir(self, name: str) -> Path:
        self._n += 1
        d = self.scratch / f"{self._n:02d}-{name}"
        d.mkdir(parents=True)
        return d

    def run(self, *args: str, cache: Path | None = None, background: bool = False):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DHUMOR_CACHE": str(cache or self.cache),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "dhumor.cli", *args]
        if self.checkpoint and args[0] == "score":
            cmd += ["--checkpoint", self.checkpoint]
        if background:
            return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)

    def score(self, src: Path, out: Path, *extra: str, cache: Path | None = None):
        return self.run("score", os.fsdecode(src), "--out", str(out), "--ocr", "none", "--quiet", *extra, cache=cache)


def images(folder: Path, n: int, start: int = 0) -> list[str]:
    names = []
    for i in range(start, start + n):
        faultkit.write_bytes_at(folder / f"m{i:03d}.png", faultkit.png_bytes(seed=i))
        names.append(f"m{i:03d}.png")
    return names


def ids_in(out: Path) -> list[str]:
    """Every row's id as written (duplicates kept); CSV ids unescaped."""
    if not out.exists():
        return []
    return [r["id"] for r in ResultsFile(out, SCHEMA).rows()]


def tally(out: Path, expected: list[str]) -> tuple[int, int]:
    got = ids_in(out)
    return len(set(expected) - set(got)), len(got) - len(set(got))


def last_line(p) -> str:
    lines = [l for l in p.stderr.strip().splitlines() if l.strip()]
    return lines[-1] if lines else ""


def summary(p) -> dict:
    for line in reversed(p.stderr.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    return {}


def traceback_free(p) -> bool:
    return "Traceback" not in p.stderr


def scored_case(b: Bench, out: Path, expected: list[str], p, extra_ok: bool = True, note: str = "") -> tuple:
    lost, dup = tally(out, expected)
    ok = p.returncode in (0, 3) and lost == 0 and dup == 0 and traceback_free(p) and extra_ok
    return (f"exit {p.returncode}, {len(expected) - lost}/{len(expected)} rows{', ' + note if note else ''}",
            ok, lost, dup)


def refused_case(p, out: Path, must: list[str]) -> tuple:
    msg = last_line(p)
    ok = p.returncode == 2 and traceback_free(p) and all(m in msg for m in must) and not ids_in(out)
    return f"exit {p.returncode}: {msg[:150]}", ok, 0, 0


# ---------------------------------------------------------------- 1. non-UTF-8 names
BAD_NAME = os.fsdecode(b"img\xff.png")


@case("file name not valid UTF-8 (score)", "UnicodeEncodeError, exit 1 after 16 of 41 rows; every rerun stops there")
def non_utf8_score(b: Bench):
    src = b.dir("nonutf8") / "in"
    src.mkdir()
    expected = images(src, 40) + [BAD_NAME]
    faultkit.write_bytes_at(src / BAD_NAME, faultkit.png_bytes(seed=99))
    out = src.parent / "r.jsonl"
    p = b.score(src, out)
    again = b.score(src, out)
    row = next(r for r in ResultsFile(out, SCHEMA).rows() if r["id"] == BAD_NAME) if out.exists() else {}
    return scored_case(b, out, expected, p, row.get("error") is None and "nothing to do" in again.stderr,
                       "the odd name scored under its exact id; rerun: nothing to do")


@case("file name not valid UTF-8 (explain)", "the same UnicodeEncodeError in `dhumor explain`")
def non_utf8_explain(b: Bench):
    src = b.dir("nonutf8-explain") / "in"
    src.mkdir()
    expected = images(src, 5) + [BAD_NAME]
    faultkit.write_bytes_at(src / BAD_NAME, faultkit.png_bytes(seed=98))
    out = src.parent / "e.jsonl"
    with faultkit.RefusingServer() as url:
        p = b.run("explain", os.fsdecode(src), "--out", str(out), "--explain", "openai", "--explain-model", "m",
                  "--base-url", url, "--ocr", "none", "--iterations", "1", "--quiet")
    got = [json.loads(l)["id"] for l in out.read_bytes().split(b"\n")[:-1]] if out.exists() else []
    lost, dup = len(set(expected) - set(got)), len(got) - len(set(got))
    ok = p.returncode in (0, 3) and lost == 0 and dup == 0 and traceback_free(p)
    return f"exit {p.returncode}, {len(set(got))}/{len(expected)} rows (explanations refused by the server, recorded)", \
        ok, lost, dup


# ---------------------------------------------------------------- 2. two runs on one output
def two_runs(b: Bench, suffix: str):
    src = b.dir(f"two-runs{suffix}") / "in"
    src.mkdir()
    expected = images(src, 100, start=200)
    out = src.parent / f"r{suffix}"
    procs = [b.run("score", str(src), "--out", str(out), "--ocr", "none", "--quiet", background=True) for _ in range(2)]
    errs = [p.communicate(timeout=900)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    refused = [e for p, e in zip(procs, errs) if p.returncode == 2]
    msg = refused[0].strip().splitlines()[-1] if refused else ""
    lost, dup = tally(out, expected)
    ok = codes == [0, 2] and "already writing this file" in msg and lost == dup == 0
    return f"exits {codes}; {len(ids_in(out))} rows for {len(expected)} images; second: {msg[:90]}", ok, lost, dup


@case("two runs on one --out (JSONL)", "both exit 0; every row written twice (600 rows for 300 images)")
def two_runs_jsonl(b: Bench):
    return two_runs(b, ".jsonl")


@case("two runs on one --out (CSV)", "both exit 0; every row written twice")
def two_runs_csv(b: Bench):
    return two_runs(b, ".csv")


# ---------------------------------------------------------------- 3. line breaks in names, CSV
def line_break_name(b: Bench, odd: str):
    src = b.dir("linebreak") / "in"
    src.mkdir()
    expected = images(src, 2) + [odd]
    faultkit.write_bytes_at(src / odd, faultkit.png_bytes(seed=97))
    out = src.parent / "r.csv"
    lines, procs = [], []
    for _ in range(3):
        procs.append(b.score(src, out))
        lines.append(out.read_bytes().count(b"\n") if out.exists() else 0)
    r = scored_case(b, out, expected, procs[0], lines == [4, 4, 4] and all(p.returncode == 0 for p in procs),
                    f"lines over 3 runs: {' -> '.join(map(str, lines))}")
    return r


@case("newline in a file name, CSV, rerun x3", "the row is added again on every rerun (3 -> 4 -> 5 lines)")
def newline_name(b: Bench):
    return line_break_name(b, "new\nline.png")


@case("carriage return in a file name, CSV, rerun x3", "the row is added again on every rerun")
def cr_name(b: Bench):
    return line_break_name(b, "carriage\rreturn.png")


# ---------------------------------------------------------------- 4. torn middle CSV row
@case("torn row in the middle of a CSV", "taken as done ('nothing to do'); the row keeps empty labels")
def torn_csv(b: Bench):
    src = b.dir("torn") / "in"
    src.mkdir()
    expected = images(src, 5, start=300)
    out = src.parent / "r.csv"
    b.score(src, out)
    lines = out.read_bytes().split(b"\n")
    lines[3] = lines[3][:60]  # the third row, torn, with two complete rows after it
    out.write_bytes(b"\n".join(lines))
    before = out.read_bytes()
    p = b.score(src, out)
    msg = last_line(p)
    ok = p.returncode == 2 and ":4: damaged row" in msg and out.read_bytes() == before and traceback_free(p)
    return f"exit {p.returncode}: {msg[:140]}", ok, 0, 0


# ---------------------------------------------------------------- 5. files skipped without a word
def one_file(b: Bench, name: str, write: Callable[[Path], None], want: Callable[[dict], bool], label: str):
    src = b.dir("types") / "in"
    src.mkdir()
    expected = images(src, 1, start=400) + [name]
    write(src / name)
    out = src.parent / "r.jsonl"
    p = b.score(src, out)
    rows = {r["id"]: r for r in ResultsFile(out, SCHEMA).rows()} if out.exists() else {}
    row = rows.get(name, {})
    what = f"scored ({row['tasks']['harmful']['label']})" if row.get("tasks") else f"error row: {row.get('error')}"
    return scored_case(b, out, expected, p, bool(row) and want(row), f"{label} {what[:110]}")


def _pil_save(fmt: str, **kw):
    def write(path: Path):
        from PIL import Image
        import io

        Image.open(io.BytesIO(faultkit.png_bytes(seed=7, size=(64, 48)))).save(path, fmt, **kw)
    return write


def _heic_header(path: Path):
    # The ISO-BMFF header of a HEIC photo (what a phone writes first); no HEIF codec ships with Pillow.
    faultkit.write_bytes_at(path, b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(range(256)) * 4)


@case(".ico file", "not listed at all (no row)")
def ico(b: Bench):
    return one_file(b, "icon.ico", _pil_save("ICO", sizes=[(48, 48)]), lambda r: r["error"] is None, "icon.ico:")


@case(".svg file", "not listed at all (no row)")
def svg(b: Bench):
    return one_file(b, "logo.svg", lambda p: p.write_text('<svg xmlns="http://www.w3.org/2000/svg"/>'),
                    lambda r: "SVG" in (r["error"] or ""), "logo.svg:")


@case(".avif file", "not listed at all (no row)")
def avif(b: Bench):
    from PIL import features

    if features.check("avif"):
        return one_file(b, "photo.avif", _pil_save("AVIF"), lambda r: r["error"] is None, "photo.avif:")
    return one_file(b, "photo.avif", _heic_header, lambda r: "AVIF" in (r["error"] or ""), "photo.avif:")


@case(".heic file", "not listed at all (no row)")
def heic(b: Bench):
    return one_file(b, "photo.heic", _heic_header, lambda r: bool(r.get("error") or r.get("tasks")), "photo.heic:")


@case("path longer than PATH_MAX", "the file is lost (no row)")
def long_path(b: Bench):
    src = b.dir("long") / "in"
    deep = faultkit.make_long_path(src)
    expected = images(src, 1, start=410) + [deep.relative_to(src).as_posix()]
    out = src.parent / "r.jsonl"
    p = b.score(src, out)
    rows = ResultsFile(out, SCHEMA).rows() if out.exists() else []
    scored = any(r["id"] == expected[1] and r["error"] is None for r in rows)
    r = scored_case(b, out, expected, p, scored, f"the {len(os.fsencode(str(deep)))}-byte path scored")
    faultkit.remove_tree(src)
    return r


@case("tree 1,200 levels deep", "RecursionError, 0 rows")
def deep_tree(b: Bench):
    src = b.dir("deep") / "in"
    deep = faultkit.make_deep_tree(src, 1200)
    expected = images(src, 1, start=420) + [deep.relative_to(src).as_posix()]
    out = src.parent / "r.jsonl"
    p = b.score(src, out)
    rows = ResultsFile(out, SCHEMA).rows() if out.exists() else []
    scored = any(r["id"] == expected[1] and r["error"] is None for r in rows)
    r = scored_case(b, out, expected, p, scored, "the file 1,200 levels down scored")
    faultkit.remove_tree(src)
    return r


# ---------------------------------------------------------------- 6. stage-cache faults
def cache_case(b: Bench, name: str, prepare: Callable[[Path], Path], expect: str, size: str = "1m"):
    d = b.dir(f"cache-{name}")
    src = d / "in"
    src.mkdir()
    expected = images(src, 6, start=500)
    out = d / "r.jsonl"
    try:
        with faultkit.tmpfs(d / "mnt", size) as mnt:
            cache = prepare(mnt)
            try:
                p = b.score(src, out, cache=cache)
            finally:
                with contextlib.suppress(faultkit.Unavailable):
                    faultkit.set_immutable(cache, False)
    except faultkit.Unavailable as e:
        return f"skipped: {e}", None, 0, 0
    warnings = [l for l in p.stderr.splitlines() if "stage cache" in l]
    ok = len(warnings) == 1 and str(cache) in warnings[0] and expect in warnings[0]
    note = f"warned {len(warnings)}x: {warnings[0].split('dhumor: ', 1)[-1][:120] if warnings else ''}"
    return scored_case(b, out, expected, p, ok, note)


def _seeded_cache(mnt: Path) -> Path:
    from dhumor.cache import StageCache

    c = StageCache(mnt / "cache.sqlite")
    c.put("ocr", "seed", b"x")
    c.close()
    for extra in mnt.glob("cache.sqlite-*"):
        extra.unlink()
    return mnt / "cache.sqlite"


@case("stage cache file is garbage", "traceback that never names the cache; 0 rows")
def cache_garbage(b: Bench):
    def prepare(mnt):
        (mnt / "cache.sqlite").write_bytes(os.urandom(16384))
        return mnt / "cache.sqlite"
    return cache_case(b, "garbage", prepare, "file is not a database")


@case("stage cache on a read-only mount", "traceback that never names the cache; 0 rows")
def cache_ro(b: Bench):
    def prepare(mnt):
        path = _seeded_cache(mnt)
        faultkit.remount_read_only(mnt)
        return path
    return cache_case(b, "ro", prepare, "read-only file system")


@case("stage cache file immutable (chattr +i)", "traceback that never names the cache; 0 rows")
def cache_immutable(b: Bench):
    def prepare(mnt):
        path = _seeded_cache(mnt)
        faultkit.set_immutable(path)
        return path
    return cache_case(b, "immutable", prepare, "not writable")


@case("stage cache on a full disk", "'cannot rollback' hides 'disk is full'; 0 rows")
def cache_full(b: Bench):
    def prepare(mnt):
        path = _seeded_cache(mnt)
        faultkit.fill_up(mnt)
        return path
    return cache_case(b, "full", prepare, "full", size="256k")


# ---------------------------------------------------------------- 7. damaged checkpoint metadata
def damaged_checkpoint(b: Bench, damage: Callable[[dict], object], must: str):
    from dhumor.inference.pipeline import default_checkpoint

    d = b.dir("ckpt")
    ckpt = d / "ckpt"
    shutil.copytree(b.checkpoint or default_checkpoint(), ckpt)
    meta = json.loads((ckpt / "dhumor.json").read_text())
    meta = damage(meta) or meta
    (ckpt / "dhumor.json").write_text(json.dumps(meta))
    src = d / "in"
    src.mkdir()
    images(src, 2, start=600)
    out = d / "r.jsonl"
    p = b.run("score", str(src), "--out", str(out), "--ocr", "none", "--quiet", "--checkpoint", str(ckpt))
    return refused_case(p, out, [must, "dhumor.json"])


@case("checkpoint: hparams removed", "KeyError: 'hparams'")
def ckpt_hparams(b: Bench):
    return damaged_checkpoint(b, lambda m: m.pop("hparams") and None, "'hparams'")


@case("checkpoint: hparams.streams removed", "KeyError: 'reasoning'")
def ckpt_streams(b: Bench):
    return damaged_checkpoint(b, lambda m: m["hparams"].pop("streams") and None, "'hparams.streams'")


@case("checkpoint: dhumor.json is a list", "AttributeError")
def ckpt_list(b: Bench):
    return damaged_checkpoint(b, lambda m: [m], "not a list")


@case("checkpoint: thresholds.balanced = \"abc\"", "a numpy error after a batch")
def ckpt_threshold(b: Bench):
    return damaged_checkpoint(b, lambda m: m.setdefault("thresholds", {}).update(balanced="abc"),
                              "'thresholds.balanced'")


# ---------------------------------------------------------------- 8. failed explanations in CSV
@case("failed explanation, CSV output", "explanation and error columns empty; summary says 0 failed")
def failed_explanation_csv(b: Bench):
    src = b.dir("explain-csv") / "in"
    src.mkdir()
    expected = images(src, 3, start=700)
    out = src.parent / "r.csv"
    with faultkit.RefusingServer() as url:
        p = b.score(src, out, "--explain", "openai", "--explain-model", "m", "--base-url", url, "--iterations", "1")
    rows = ResultsFile(out, SCHEMA).rows() if out.exists() else []
    shown = sum(1 for r in rows if "403" in r.get("explanation_error", ""))
    counted = summary(p).get("explanation_failed")
    return scored_case(b, out, expected, p, shown == len(expected) and counted == len(expected),
                       f"explanation_error filled in {shown} rows; summary explanation_failed={counted}")


# ---------------------------------------------------------------- 9. bad --out
def bad_out(b: Bench, make: Callable[[Path], Path], must: list[str]):
    d = b.dir("badout")
    src = d / "in"
    src.mkdir()
    images(src, 1, start=800)
    try:
        out = make(d)
    except faultkit.Unavailable as e:
        return f"skipped: {e}", None, 0, 0
    try:
        p = b.score(src, out)
        msg = last_line(p)
        ok = p.returncode == 2 and traceback_free(p) and all(m in msg for m in must) and len(p.stderr.strip().splitlines()) == 1
        return f"exit {p.returncode}: {msg[:140]}", ok, 0, 0
    finally:
        faultkit.unmount(d / "mnt")


@case("--out is a folder", "traceback naming the path")
def out_dir(b: Bench):
    return bad_out(b, lambda d: (d / "results").mkdir() or d / "results", ["is a folder"])


@case("--out in a read-only place", "traceback naming the path")
def out_ro(b: Bench):
    def make(d):
        faultkit.mount_tmpfs(d / "mnt")
        faultkit.remount_read_only(d / "mnt")
        return d / "mnt" / "r.jsonl"
    return bad_out(b, make, ["Read-only file system"])


@case("--out without a suffix", "traceback naming the path")
def out_nosuffix(b: Bench):
    return bad_out(b, lambda d: d / "results", ["has no suffix"])


# ================================================================ issue 28: nothing damaged, nothing mixed
# The "before" column of these cases is what issue 28's attack measured on the previous code.
def _notes(d: Path) -> Path:
    notes = d / "notes.jsonl"
    notes.write_text("my notes, line one\nline two, no final newline")
    return notes


def _manifest(d: Path) -> Path:
    imgs = d / "images"
    imgs.mkdir()
    for i in range(3):
        faultkit.write_bytes_at(imgs / f"m{i}.png", faultkit.png_bytes(seed=900 + i))
    m = d / "memes.jsonl"
    m.write_text("".join(json.dumps({"id": f"m{i}", "image": f"m{i}.png", "text": f"caption {i}"}) + "\n"
                         for i in range(3)))
    return m


def foreign_out(b: Bench, target_of: Callable[[Path, Path], Path], link: bool) -> tuple:
    d = b.dir("foreign-out")
    manifest = _manifest(d)
    target = target_of(d, manifest)
    out = target
    if link:
        out = d / "link.jsonl"
        out.symlink_to(target)
    before = target.read_bytes()
    t = time.perf_counter()
    p = b.score(manifest, out)
    took = time.perf_counter() - t
    damaged = int(target.read_bytes() != before)
    msg = last_line(p)
    ok = p.returncode == 2 and traceback_free(p) and not damaged and len(p.stderr.strip().splitlines()) == 1
    return f"exit {p.returncode} in {took:.1f} s, file {'CHANGED' if damaged else 'byte-identical'}: {msg[:110]}", \
        ok, 0, 0, damaged


@case("--out a notes.jsonl without final newline", "its last line cut, then exit 2 (after the model loaded, ~50 s)")
def out_notes(b: Bench):
    return foreign_out(b, lambda d, m: _notes(d), link=False)


@case("--out a symlink to notes.jsonl", "the target's last line cut, then exit 2")
def out_link_notes(b: Bench):
    return foreign_out(b, lambda d, m: _notes(d), link=True)


@case("--out the input manifest itself", "last manifest row replaced by a score row; exit 1 KeyError: 'tasks'")
def out_manifest(b: Bench):
    return foreign_out(b, lambda d, m: m, link=False)


@case("--out a symlink to the input manifest", "the manifest damaged the same way")
def out_link_manifest(b: Bench):
    return foreign_out(b, lambda d, m: m, link=True)


def odd_manifest(b: Bench, raw: bytes, expected: list[str], label: str) -> tuple:
    d = b.dir("manifest")
    imgs = d / "images"
    imgs.mkdir()
    for i in range(8):
        faultkit.write_bytes_at(imgs / f"m{i}.png", faultkit.png_bytes(seed=920 + i))
    m = d / "memes.jsonl"
    m.write_bytes(raw)
    out = d / "r.jsonl"
    p1 = b.score(m, out)
    p2 = b.score(m, out)
    lost, dup = tally(out, expected)
    rows = {r["id"]: r for r in ResultsFile(out, SCHEMA).rows()} if out.exists() else {}
    scored = sum(1 for i in expected if i in rows and not rows[i]["error"])
    ok = p1.returncode in (0, 3) and p2.returncode in (0, 3) and lost == dup == 0 and traceback_free(p1)
    return f"exits {p1.returncode}/{p2.returncode}: {len(rows)}/{len(expected)} rows, {scored} scored ({label})", \
        ok, lost, dup


@case("manifest caption with raw U+2028 and U+0085, scored twice", "b, m6, m7 written twice; that meme never scored")
def manifest_line_separators(b: Bench):
    rows = [{"id": f"m{i}", "image": f"m{i}.png", "text": f"caption {i}"} for i in range(8)]
    rows[1]["text"], rows[4]["text"] = "top\u2028bottom", "next\x85line"
    rows.insert(6, {"id": "b", "image": "missing.png"})  # an error row after them: its id must stay its own
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    return odd_manifest(b, raw, [r["id"] for r in rows], "line separators kept inside their captions")


@case("manifest starting with a UTF-8 BOM", "first meme lost ('Unexpected UTF-8 BOM'); evaluate refuses the file")
def manifest_bom(b: Bench):
    rows = [{"id": f"m{i}", "image": f"m{i}.png", "text": f"caption {i}"} for i in range(3)]
    raw = b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in rows).encode()
    return odd_manifest(b, raw, [r["id"] for r in rows], "BOM accepted")


def rerun_with(b: Bench, *extra: str, other_checkpoint: bool = False) -> tuple:
    from dhumor.resources import default_checkpoint

    d = b.dir("rerun")
    src = d / "in"
    src.mkdir()
    expected = images(src, 3, start=940)
    out = d / "r.jsonl"
    first = b.score(src, out)
    images(src, 1, start=943)  # one new meme: the rerun has work to do
    before = out.read_bytes()
    args = list(extra)
    if other_checkpoint:
        ckpt = d / "other"
        shutil.copytree(b.checkpoint or default_checkpoint(), ckpt)
        meta = json.loads((ckpt / "dhumor.json").read_text())
        meta["thresholds"]["balanced"] = 0.31  # another model's decisions, as far as the rows can tell
        (ckpt / "dhumor.json").write_text(json.dumps(meta))
        args += ["--checkpoint", str(ckpt)]
    p = b.score(src, out, *args)
    damaged = int(out.read_bytes() != before)
    msg = last_line(p)
    ok = first.returncode == 0 and p.returncode == 2 and not damaged and "--rescore" in msg
    lost, _ = tally(out, expected)
    return f"exit {p.returncode}, file {'CHANGED' if damaged else 'unchanged'}: {msg[:120]}", ok, lost, 0, damaged


@case("rerun into an output with another --checkpoint", "'nothing to do', exit 0: two models' rows mixed silently")
def rerun_checkpoint(b: Bench):
    return rerun_with(b, other_checkpoint=True)


@case("rerun into an output with another --decision-threshold", "rows of two thresholds mixed silently")
def rerun_threshold(b: Bench):
    return rerun_with(b, "--decision-threshold", "0.2")


def _strip(folder: Path) -> None:
    from PIL import Image

    Image.new("RGB", (20000, 20), "white").save(folder / "strip.png")


@case("`dhumor ocr` on a 20000x20 strip among others", "ResizeImgError: exit 1, the remaining inputs get no row")
def ocr_strip(b: Bench):
    d = b.dir("ocr-strip")
    src = d / "in"
    src.mkdir()
    expected = images(src, 3, start=950) + ["strip.png"]
    _strip(src)
    p = b.run("ocr", str(src), "--ocr", "rapidocr", "--quiet")
    rows = {}
    for line in p.stdout.splitlines():
        with contextlib.suppress(ValueError):
            r = json.loads(line)
            rows[r["id"]] = r
    lost = len(set(expected) - set(rows))
    strip = rows.get("strip.png", {})
    ok = p.returncode == 3 and lost == 0 and strip.get("error_kind") == "permanent" and traceback_free(p)
    return f"exit {p.returncode}, {len(rows)}/{len(expected)} rows, strip: {strip.get('error_kind')} " \
           f"({(strip.get('error') or '')[:60]})", ok, lost, 0


@case("`dhumor score` on a 20000x20 strip, rerun", "a row marked transient: every rerun retries it")
def score_strip(b: Bench):
    d = b.dir("score-strip")
    src = d / "in"
    src.mkdir()
    expected = images(src, 2, start=960) + ["strip.png"]
    _strip(src)
    out = d / "r.jsonl"
    p = b.score(src, out, "--ocr", "rapidocr")
    again = b.score(src, out, "--ocr", "rapidocr")
    row = next((r for r in ResultsFile(out, SCHEMA).rows() if r["id"] == "strip.png"), {}) if out.exists() else {}
    ok_row = row.get("error_kind") == "permanent" and "nothing to do" in again.stderr
    lost, dup = tally(out, expected)
    ok = p.returncode == 3 and again.returncode == 3 and lost == dup == 0 and ok_row
    return f"exits {p.returncode}/{again.returncode}, strip {row.get('error_kind')}; rerun: " \
           f"{'nothing to do' if 'nothing to do' in again.stderr else 'retried'}", ok, lost, dup


def damaged_weights(b: Bench, meta_change=None, tensor_change=None, must: str = "") -> tuple:
    from safetensors.torch import load_file, save_file

    from dhumor.resources import default_checkpoint

    d = b.dir("ckpt28")
    ckpt = d / "ckpt"
    shutil.copytree(b.checkpoint or default_checkpoint(), ckpt)
    if meta_change:
        meta = json.loads((ckpt / "dhumor.json").read_text())
        meta_change(meta)
        (ckpt / "dhumor.json").write_text(json.dumps(meta))
    if tensor_change:
        t = load_file(ckpt / "model.safetensors")
        tensor_change(t)
        save_file(t, ckpt / "model.safetensors", metadata={"format": "dhumor-checkpoint/1"})
    src = d / "in"
    src.mkdir()
    images(src, 1, start=970)
    out = d / "r.jsonl"
    t0 = time.perf_counter()
    p = b.run("score", str(src), "--out", str(out), "--ocr", "none", "--quiet", "--checkpoint", str(ckpt))
    took = time.perf_counter() - t0
    after, ok, lost, dup = refused_case(p, out, [must])
    ok = ok and len(p.stderr.strip().splitlines()) == 1
    return f"{after[:150]} ({took:.1f} s)", ok, lost, dup


def _first_linear(t):
    return next(k for k, v in t.items() if k.endswith("weight") and v.ndim == 2)


@case("checkpoint: a tensor of the wrong shape", "exit 1 'internal error ... please report it', tensor not named")
def ckpt_shape(b: Bench):
    def cut(t):
        k = _first_linear(t)
        t[k] = t[k][:, :-1].contiguous()
    return damaged_weights(b, tensor_change=cut, must="damaged weights: tensor 'net.")


@case("checkpoint: hparams.d_model = 1e12", "exit 1 'internal error' (an allocation of 2e16 bytes)")
def ckpt_d_model(b: Bench):
    return damaged_weights(b, meta_change=lambda m: m["hparams"].update(d_model=10 ** 12), must="'hparams.d_model'")


@case("checkpoint: a temperature of 1e308", "1.5 KB of C++ stack as its 'one line'")
def ckpt_temperature(b: Bench):
    return damaged_weights(b, meta_change=lambda m: m["calibration"]["harmful"].update(temperature=1e308),
                           must="'calibration.harmful.temperature'")


@case("checkpoint: \"thresholds\": null", "silently decides at 0.5")
def ckpt_no_thresholds(b: Bench):
    from dhumor.resources import default_checkpoint

    d = b.dir("ckpt-null")
    ckpt = d / "ckpt"
    shutil.copytree(b.checkpoint or default_checkpoint(), ckpt)
    meta = json.loads((ckpt / "dhumor.json").read_text())
    meta["thresholds"] = None
    (ckpt / "dhumor.json").write_text(json.dumps(meta))
    src = d / "in"
    src.mkdir()
    expected = images(src, 2, start=980)
    out = d / "r.jsonl"
    p = b.run("score", str(src), "--out", str(out), "--ocr", "none", "--quiet", "--checkpoint", str(ckpt))
    warned = next((l for l in p.stderr.splitlines() if "no decision thresholds" in l), "")
    return scored_case(b, out, expected, p, bool(warned), f"warning: {warned[:100]}")


def bad_flag(b: Bench, *flag: str) -> tuple:
    d = b.dir("flag")
    src = d / "in"
    src.mkdir()
    images(src, 1, start=990)
    out = d / "r.jsonl"
    t0 = time.perf_counter()
    p = b.score(src, out, *flag)
    took = time.perf_counter() - t0
    after, ok, lost, dup = refused_case(p, out, [flag[0]])
    return f"{after[:120]} in {took:.2f} s", ok and took < 10, lost, dup


@case("--decision-threshold 1.5", "refused after the model loaded (22 s)")
def flag_threshold(b: Bench):
    return bad_flag(b, "--decision-threshold", "1.5")


@case("--decision-threshold nan", "refused after the model loaded (22 s)")
def flag_nan(b: Bench):
    return bad_flag(b, "--decision-threshold", "nan")


@case("stage cache held by another process's BEGIN EXCLUSIVE (40 s)", "blocks silently (up to 60 s)")
def cache_exclusive(b: Bench):
    d = b.dir("cache-lock")
    cache = d / "cache.sqlite"
    from dhumor.cache import StageCache

    c = StageCache(cache)
    c.put("warm", "k", b"v")
    c.close()
    src = d / "in"
    src.mkdir()
    expected = images(src, 3, start=1000)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, time\n"
        f"c = sqlite3.connect({str(cache)!r}, isolation_level=None)\n"
        "c.execute('BEGIN EXCLUSIVE'); print('held', flush=True); time.sleep(40)\n")],
        stdout=subprocess.PIPE, text=True)
    try:
        holder.stdout.readline()
        out = d / "r.jsonl"
        p = b.score(src, out, cache=cache)
    finally:
        holder.kill()
        holder.wait()
    said = next((l for l in p.stderr.splitlines() if "is locked by another process" in l), "")
    return scored_case(b, out, expected, p, bool(said), f"said: {said[20:110]}")


@case("explanation server answering every request with a redirect to itself", "about 124 requests per meme")
def redirect_loop(b: Bench):
    import http.server
    import threading

    hits = []

    class Loop(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            hits.append(1)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(307)
            self.send_header("Location", self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Loop)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    d = b.dir("redirect")
    src = d / "in"
    src.mkdir()
    expected = images(src, 2, start=1010)
    out = d / "r.jsonl"
    try:
        p = b.score(src, out, "--explain", "openai", "--explain-model", "m", "--base-url",
                    f"http://127.0.0.1:{httpd.server_address[1]}/v1", "--iterations", "1")
    finally:
        httpd.shutdown()
        httpd.server_close()
    per = len(hits) / len(expected)
    return scored_case(b, out, expected, p, per <= 6, f"{per:.0f} requests per meme")


# ---------------------------------------------------------------- report
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=None, help="checkpoint to score with (default: the shipped one)")
    ap.add_argument("--json", default=str(results_path("faults")), help="where the outcomes go")
    ap.add_argument("--only", default=None, help="run only the cases whose name contains this (several: A|B)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    rec = Recorder("faults")
    refuse_subset_over_default(ap, args.json, results_path("faults"), ["--only"] if args.only else [],
                               flag="--json")
    global SCHEMA
    if args.checkpoint:
        from dhumor.model.checkpoint import read_meta

        SCHEMA = TaskSchema.from_dict(read_meta(args.checkpoint)["schema"])
    scratch = Path(tempfile.mkdtemp(prefix="dhumor-faults-"))
    bench = Bench(scratch, args.checkpoint)
    outcomes: list[Outcome] = []
    t0 = time.time()
    try:
        for name, before, fn in CASES:
            if args.only and not any(o in name for o in args.only.split("|")):
                continue
            t = time.time()
            try:
                after, handled, lost, dup, *damaged = fn(bench)
            except Exception as e:  # a case that crashes the bench is a fault not handled
                after, handled, lost, dup, damaged = f"bench error: {type(e).__name__}: {e}", False, 0, 0, []
            outcomes.append(Outcome(name, before, after, handled, lost, dup, sum(damaged)))
            print(f"[{time.time() - t:5.1f}s] {'ok  ' if handled else 'SKIP' if handled is None else 'FAIL'} {name}: "
                  f"{after}", file=sys.stderr)
    finally:
        if not args.keep:
            faultkit.remove_tree(scratch)
    tried = [o for o in outcomes if o.handled is not None]
    totals = {"tried": len(tried), "handled": sum(bool(o.handled) for o in tried),
              "skipped": len(outcomes) - len(tried), "rows_lost": sum(o.rows_lost for o in outcomes),
              "rows_duplicated": sum(o.rows_duplicated for o in outcomes),
              "files_damaged": sum(o.files_damaged for o in outcomes)}
    print("| case | before (issue 11 / issue 28) | after (measured) | handled |")
    print("|---|---|---|---|")
    for o in outcomes:
        cell = o.after.replace("|", "\\|").replace("\n", " ")
        print(f"| {o.case} | {o.before} | {cell} | {'yes' if o.handled else 'skipped' if o.handled is None else 'NO'} |")
    print(f"\ntried {totals['tried']}, handled {totals['handled']}, skipped {totals['skipped']}, "
          f"rows lost {totals['rows_lost']}, rows duplicated {totals['rows_duplicated']}, "
          f"files damaged {totals['files_damaged']} "
          f"({platform.machine()}, {os.cpu_count()} CPUs, {time.time() - t0:.0f} s)")
    rec.write({"totals": totals, "cases": [asdict(o) for o in outcomes]}, args.json)
    return 0 if totals["handled"] == totals["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
