"""How long `dhumor explain` takes to give up on a server that hangs, with the default settings.

Starts a local OpenAI-compatible endpoint that accepts every request and never answers, then runs
`dhumor explain --backend openai` on 20 generated memes against it (the real command, in a child
process). Target (issue 14): the batch ends in <= 3 minutes with every meme accounted for (one row
each, all failed with a per-row reason) and exit code 3; before the fix, 2 memes took 10 minutes.

    python bench/explain_server_down.py [--memes 20] [--timeout SECONDS]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: the repository's dhumor, and record.py beside this file

from record import Recorder, results_path  # noqa: E402


def hung_server() -> tuple[ThreadingHTTPServer, threading.Event, list]:
    release, seen = threading.Event(), []

    class Hang(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            seen.append(time.monotonic())
            release.wait(900)  # never answers while the benchmark runs
            self.close_connection = True

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Hang)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, release, seen


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--memes", type=int, default=20)
    ap.add_argument("--timeout", default=None, help="DHUMOR_OPENAI_TIMEOUT for the run (default: the built-in 60 s)")
    ap.add_argument("--out", default=str(results_path("explain_server_down")))
    args = ap.parse_args(argv)
    rec = Recorder("explain_server_down")
    srv, release, seen = hung_server()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    with tempfile.TemporaryDirectory() as tmp:
        memes = Path(tmp) / "memes"
        memes.mkdir()
        for i in range(args.memes):
            Image.new("RGB", (64, 64), (i * 12 % 256, 80, 160)).save(memes / f"meme_{i:02d}.png")
        out = Path(tmp) / "expl.jsonl"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        if args.timeout:
            env["DHUMOR_OPENAI_TIMEOUT"] = str(args.timeout)
        cmd = [sys.executable, "-m", "dhumor.cli", "explain", str(memes), "--out", str(out), "--explain", "openai",
               "--explain-model", "m", "--base-url", url, "--ocr", "none", "--quiet", "--cache", str(Path(tmp) / "c.sqlite")]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
        took = time.monotonic() - t0
        rows = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    release.set()
    srv.shutdown()
    ids = Counter(r["id"] for r in rows)
    report = {
        "memes": args.memes, "seconds": round(took, 1), "exit_code": proc.returncode,
        "rows": len(rows), "distinct_ids": len(ids), "duplicates": sum(c > 1 for c in ids.values()),
        "failed_rows": sum(r["status"] == "failed" for r in rows), "retry_marked": sum(bool(r.get("retry")) for r in rows),
        "server_down_rows": sum((r.get("error") or "").startswith("explanation server down") for r in rows),
        "requests_reaching_server": len(seen),
        "example_error": next((r["error"] for r in rows if r.get("error")), None),
        "target_met": took <= 180 and len(ids) == args.memes and proc.returncode == 3,
    }
    print(json.dumps(report, indent=1))
    rec.write(report, args.out)
    if proc.returncode not in (0, 3):
        print(proc.stderr[-2000:], file=sys.stderr)


if __name__ == "__main__":
    main()
