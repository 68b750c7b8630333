"""A big folder scored with `dhumor score --ocr none`: peak RSS, time to the first row, memes/s, and what
resuming costs, for two versions of dhumor side by side (issue 28, "Scale").

    python bench/scale_folder.py --n 20000 --resume-n 20000 --before /path/to/other/checkout \
        --json bench/results/scale_folder.json

Scoring: N small PNGs (64x48, each different, so no feature is shared) are generated into a scratch
folder; each version scores them into its own results file with its own empty stage cache (nothing is
served from the other's run), as a fresh `python -m dhumor.cli` process whose peak RSS comes from
wait4. Resuming: a folder of RESUME_N images and a finished results file of RESUME_N rows (each a copy
of a real row of the scoring run under its own id, with this version's provenance) are rerun by each
version ("nothing to do"): peak RSS and time show what listing and resuming cost as the file grows,
without scoring RESUME_N memes first. "scan" measures in this process, with tracemalloc, the memory
that reading that file needs: every row (``rows()``, what resuming read before) against the id-only
scan resuming uses now (``index()``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import Recorder, as_reported, results_path  # noqa: E402


def make_folder(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        sub = folder / f"{i // 1000:03d}"  # 1,000 per folder, as a real archive would be
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(sub / f"m{i:06d}.png")


def run_score(code: Path, folder: Path, out: Path, cache: Path, checkpoint: str | None, n: int) -> dict:
    """One `dhumor score` process: wall time, time to the first row on disk, peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(code), "DHUMOR_CACHE": str(cache), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "dhumor.cli", "score", str(folder), "--out", str(out), "--ocr", "none", "--quiet"]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=code, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if first is None and out.exists() and out.stat().st_size > 0:
            first = time.perf_counter() - t0
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    summary = next((json.loads(l) for l in reversed(err.splitlines()) if l.startswith("{")), {})
    scored = summary.get("scored", 0) + summary.get("failed", 0)
    return {"exit": proc.returncode, "wall_s": round(wall, 1), "first_row_s": round(first, 1) if first else None,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "rows_written": scored,
            "memes_per_s": round(scored / wall, 1) if scored else None,
            "memes_per_s_after_first_row": round(scored / (wall - first), 1) if scored and first else None,
            "already_done": summary.get("already_done"), "stderr_tail": err.strip().splitlines()[-1:]}


def scan_memory(out: Path) -> dict:
    """Peak Python memory to read the finished file: every row (rows()) vs the ids (index())."""
    sys.path.insert(0, str(ROOT))
    from dhumor.inference.results_file import ResultsFile
    from dhumor.schema import HARMEME

    res = {"file_mb": round(out.stat().st_size / 2**20, 1)}
    for name in ("rows", "index"):
        rf = ResultsFile(out, HARMEME)
        tracemalloc.start()
        t = time.perf_counter()
        got = getattr(rf, name)()
        took = time.perf_counter() - t
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        res[name] = {"rows": len(got), "peak_mb": round(peak / 2**20, 1), "seconds": round(took, 2)}
        del got
    return res


def synthetic_results(folder: Path, out: Path, template: dict) -> None:
    """A finished results file with one realistic row per file under ``folder`` (ids as `dhumor score`
    lists them: the path relative to the folder)."""
    with open(out, "w", encoding="utf-8") as fh:
        for sub in sorted(folder.iterdir()):
            for f in sorted(sub.iterdir()):
                rid = f"{sub.name}/{f.name}"
                fh.write(json.dumps({**template, "id": rid, "path": str(f)}, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=20000, help="memes scored by each version")
    ap.add_argument("--resume-n", type=int, default=20000, help="rows of the finished file each version resumes")
    ap.add_argument("--before", default=None, help="checkout of the earlier version (its repository root)")
    ap.add_argument("--checkpoint", default=None, help="default: the one shipped with dhumor")
    ap.add_argument("--json", default=str(results_path("scale_folder")))
    ap.add_argument("--scratch", default=None, help="where the folders and outputs go (default: a temp dir)")
    ap.add_argument("--resume-only", action="store_true",
                    help="keep the scoring numbers of --json (same --scratch) and measure the resumes again")
    args = ap.parse_args(argv)
    rec = Recorder("scale_folder")
    scratch = Path(args.scratch or tempfile.mkdtemp(prefix="dhumor-scale-"))
    folder, big = scratch / "memes", scratch / "big"
    t = time.perf_counter()
    if not folder.exists():
        make_folder(folder, args.n)
    if not big.exists():
        make_folder(big, args.resume_n)
    print(f"{args.n} + {args.resume_n} images in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    versions = {"after": ROOT}
    if args.before:
        versions = {"before": Path(args.before), **versions}
    results: dict = {"n": args.n, "resume_n": args.resume_n,
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other agents' work "
                                f"(load average {os.getloadavg()[0]:.1f} at start)", "versions": {}}
    if args.resume_only:
        old = json.loads(Path(args.json).read_text())
        results["versions"] = {k: {"score": v["score"]} for k, v in old["versions"].items()}
        results["machine_while_scoring"] = as_reported(old, "machine")
    for name, code in versions.items():
        if args.resume_only:
            continue
        out, cache = scratch / f"{name}.jsonl", scratch / f"{name}-cache.sqlite"
        first = run_score(code, folder, out, cache, args.checkpoint, args.n)
        print(f"{name}: {first}", file=sys.stderr)
        results["versions"][name] = {"score": first}
    # Resume a finished file of resume_n rows: rows as this version writes them (after's carry provenance;
    # the earlier version ignores the key).
    template = json.loads((scratch / "after.jsonl").read_text().split("\n")[0])
    big_out = scratch / "big.jsonl"
    synthetic_results(big, big_out, template)
    for name, code in versions.items():
        shutil.copy(big_out, scratch / f"big-{name}.jsonl")
        resume = run_score(code, big, scratch / f"big-{name}.jsonl", scratch / f"{name}-cache.sqlite",
                           args.checkpoint, args.resume_n)
        print(f"{name} resume of {args.resume_n} rows: {resume}", file=sys.stderr)
        results["versions"][name]["resume"] = resume
    results["scan"] = scan_memory(big_out)
    results["load_average_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps(results, indent=1))
    rec.write(results, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
