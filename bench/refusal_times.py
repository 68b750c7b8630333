"""Time from start to refusal for each configuration error of `dhumor score` (issue 28: goal under 2 s,
before any model loads). Each case is a fresh `python -m dhumor.cli` process; its wall time includes
Python's start-up. Prints a table and writes JSON.

    python bench/refusal_times.py --json bench/results/refusal_times.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from record import Recorder, results_path  # noqa: E402

import faultkit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs per case (the median is reported)")
    ap.add_argument("--json", default=str(results_path("refusal_times")))
    args = ap.parse_args(argv)
    rec = Recorder("refusal_times")
    from dhumor.model.checkpoint_meta import checkpoint_digest
    from dhumor.resources import default_checkpoint
    from dhumor.inference.results_file import dumps_row

    d = Path(tempfile.mkdtemp(prefix="dhumor-refusal-"))
    shipped = default_checkpoint()
    imgs = d / "images"
    imgs.mkdir()
    faultkit.write_bytes_at(imgs / "a.png", faultkit.png_bytes(1))
    manifest = d / "memes.jsonl"
    manifest.write_text(json.dumps({"id": "a", "image": "a.png", "text": "x"}) + "\n")
    notes = d / "notes.jsonl"
    notes.write_text("notes\nno final newline")
    (d / "link.jsonl").symlink_to(manifest)
    (d / "folder.jsonl").mkdir()

    def ckpt(name, change=None, tensors=None):
        c = d / name
        shutil.copytree(shipped, c)
        if change:
            m = json.loads((c / "dhumor.json").read_text())
            change(m)
            (c / "dhumor.json").write_text(json.dumps(m))
        if tensors:
            from safetensors.torch import load_file, save_file

            t = load_file(c / "model.safetensors")
            tensors(t)
            save_file(t, c / "model.safetensors", metadata={"format": "dhumor-checkpoint/1"})
        return str(c)

    def cut(t):
        k = next(k for k, v in t.items() if k.endswith("weight") and v.ndim == 2)
        t[k] = t[k][:, :-1].contiguous()

    done = d / "done.jsonl"  # rows of the shipped checkpoint at its balanced threshold
    meta = json.loads((Path(shipped) / "dhumor.json").read_text())
    prov = {"checkpoint": checkpoint_digest(shipped), "threshold": float(meta["thresholds"]["balanced"]), "ocr": "none",
            "explainer": None}
    done.write_text(dumps_row({"id": "a.png", "path": "x", "sha256": None, "tasks": None, "decision": None,
                               "error": "x", "error_kind": "permanent", "provenance": prov}) + "\n")
    base = ["score", str(imgs), "--ocr", "none", "--quiet"]
    out = ["--out", str(d / "r.jsonl")]
    cases = {
        "--decision-threshold 1.5": [*base, *out, "--decision-threshold", "1.5"],
        "--decision-threshold nan": [*base, *out, "--decision-threshold", "nan"],
        "--batch-size 0": [*base, *out, "--batch-size", "0"],
        "--shard 5/2": [*base, *out, "--shard", "5/2"],
        "input does not exist": ["score", str(d / "nope"), *out],
        "--out is a folder": [*base, "--out", str(d / "folder.jsonl")],
        "--out a notes file (not a results file)": [*base, "--out", str(notes)],
        "--out the input manifest": ["score", str(manifest), "--out", str(manifest)],
        "--out a symlink to the input manifest": ["score", str(manifest), "--out", str(d / "link.jsonl")],
        "--explain openai without a server": [*base, *out, "--explain", "openai"],
        "checkpoint: hparams.streams removed": [*base, *out, "--checkpoint", ckpt("c1", lambda m: m["hparams"].pop("streams"))],
        "checkpoint: hparams.d_model = 1e12": [*base, *out, "--checkpoint", ckpt("c2", lambda m: m["hparams"].update(d_model=10**12))],
        "checkpoint: temperature 1e308": [*base, *out, "--checkpoint",
                                          ckpt("c3", lambda m: m["calibration"]["harmful"].update(temperature=1e308))],
        "checkpoint: unknown encoder name": [*base, *out, "--checkpoint",
                                             ckpt("c4", lambda m: m["hparams"].update(image_encoder="efficientnet-lite9"))],
        "checkpoint: a tensor of the wrong shape": [*base, *out, "--checkpoint", ckpt("c5", tensors=cut)],
        "rerun with another --decision-threshold": [*base, "--out", str(done), "--decision-threshold", "0.2"],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DHUMOR_CACHE": str(d / "cache.sqlite")}
    rows = []
    for name, cmd in cases.items():
        times, p = [], None
        for _ in range(args.repeat):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-m", "dhumor.cli", *cmd], capture_output=True, text=True, env=env,
                               cwd=ROOT, timeout=300)
            times.append(time.perf_counter() - t)
        line = (p.stderr.strip().splitlines() or [""])[-1]
        rows.append({"case": name, "exit": p.returncode, "seconds_median": round(statistics.median(times), 2),
                     "seconds_min": round(min(times), 2), "stderr_lines": len(p.stderr.strip().splitlines()),
                     "message": line[:200]})
        print(f"{rows[-1]['seconds_median']:6.2f} s  exit {p.returncode}  {name}: {line[:110]}", file=sys.stderr)
    shutil.rmtree(d, ignore_errors=True)
    res = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other agents' work "
                      f"(load average {os.getloadavg()[0]:.1f})", "python_startup_included": True, "cases": rows}
    print("| configuration error | exit | time to refusal (median) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['exit']} | {r['seconds_median']} s |")
    rec.write(res, args.json)
    return 0 if all(r["exit"] == 2 and r["stderr_lines"] == 1 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
