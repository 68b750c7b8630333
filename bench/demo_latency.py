"""Demo latency in a real browser, p50 and p95 from upload to: the decision on the page, the first
finished explanation iteration (streamed), and the whole loop.

Starts `dhumor demo` (cold stage cache), drives Debian's headless Chromium with Selenium, uploads
each meme in a freshly loaded page and waits for the decision to appear.

    python bench/demo_latency.py --n 20                   # memes: --images, default <data root>/images
    python bench/demo_latency.py --images ... --n 20 --explain offline
    python bench/demo_latency.py --explain offline --users 4 --n 2   # 1 user, then 4 users at once

``--users N`` measures through Gradio's own client instead of a browser (N browsers would take the
CPU the server is measured on): first with one user scoring ``--n`` memes one after another, then
with N users doing so at the same time, in the same warm demo, each meme a new one (never served
from the cache). Times are from the request to the first streamed output showing the decision,
the first finished explanation iteration, and the last output. Results go to
bench/results/demo_latency.json (``--users``) or bench/results/demo_latency_browser.json (browser).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from dhumor.paths import data_root
from dhumor.resources import EXAMPLES_DIR
from record import Recorder

ROOT = Path(__file__).resolve().parent.parent
# Runs in the page: records performance.now() when the decision shows (not pending), when a finished
# Role-Reversal iteration shows, and when the status says the meme is scored (or failed).
WATCH = """
window.__dh = {done: false};
const txt = id => (document.getElementById(id) || {}).innerText || "";
const check = () => {
  const m = window.__dh, now = performance.now(), dec = txt("decision"), st = txt("status");
  if (!m.decision && dec.includes("Decision:") && !dec.includes("pending")) m.decision = now;
  if (!m.first_explanation && txt("explanation").includes("Iteration")) m.first_explanation = now;
  if (!m.done && st.startsWith("Scored in")) { m.full = now; m.done = true; }
  if (!m.done && /^(Cannot use this file|Something went wrong|This meme could not)/.test(st)) { m.failed = true; m.done = true; }
};
new MutationObserver(check).observe(document.body, {subtree: true, childList: true, characterData: true});
"""


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=str(data_root() / "images"),
                    help="a folder of memes (default: the data root's images/)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--explain", default="none")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--threads", type=int, default=None, help="the demo's llama.cpp threads (default: all)")
    ap.add_argument("--samples", action="store_true", help="also print each meme's latencies")
    ap.add_argument("--users", type=int, default=None,
                    help="concurrent users through gradio_client: measure 1 user, then this many at once")
    ap.add_argument("--out", default=None, help="default bench/results/demo_latency.json with --users, "
                                                "else bench/results/demo_latency_browser.json")
    args = ap.parse_args(argv)
    rec = Recorder("demo_latency" if args.users else "demo_latency_browser")
    if args.users:
        return users_main(args, rec)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    if not Path(args.images).is_dir():
        print(f"demo_latency: no folder of memes at {args.images}: pass --images DIR (e.g. --images "
              f"{EXAMPLES_DIR} --n 5), or set DHUMOR_DATA to Harm-C (dhumor data harmeme)", file=sys.stderr)
        sys.exit(2)
    files = _pick_memes(Path(args.images), args.n)  # a repeated image would come from the cache
    seen = {p.read_bytes() for p in files}
    tmp = Path(tempfile.mkdtemp())
    proc, url = _start_demo(args, tmp)
    o = Options()
    o.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    lat: dict[str, list[float]] = {"decision": [], "first_explanation": [], "full": []}
    samples: list[dict] = []  # per meme, with the server's own "Scored in" line
    try:
        # The first upload warms the models up and is not counted: a shipped example, not one of the
        # measured memes (a measured meme would then come from the stage cache in 0.3 s).
        warm = next((p for p in sorted(EXAMPLES_DIR.glob("*.jpg")) if p.read_bytes() not in seen), None)
        if warm is None:
            print("demo_latency: every shipped example is among the measured memes; the warm-up needs another: "
                  "lower --n", file=sys.stderr)
            sys.exit(2)
        for i, f in enumerate([warm, *files]):
            d.get(url)
            inp = None
            while not inp:
                inp = d.find_elements(By.CSS_SELECTOR, "#meme-input input[type=file]")
                time.sleep(0.05)
            # The page itself timestamps each milestone (a MutationObserver), so the measurement
            # needs no tight WebDriver polling, which on a 2-core machine would take CPU from the server.
            d.execute_script(WATCH)
            t0 = d.execute_script("return performance.now()")
            inp[0].send_keys(str(f.resolve()))
            while not d.execute_script("return window.__dh.done"):
                time.sleep(0.5)
            marks = d.execute_script("return window.__dh")
            seen = {k: (marks[k] - t0) / 1000 for k in ("decision", "first_explanation", "full") if marks.get(k)}
            if marks.get("failed"):
                seen = {}  # no decision to time: the meme is left out of the latencies
            elif "full" in seen:
                seen.setdefault("decision", seen["full"])
            if i > 0:
                for k, v in seen.items():
                    lat[k].append(v)
                samples.append({"meme": f.name, **{k: round(v, 2) for k, v in seen.items()},
                                "server": d.find_element(By.ID, "status").text})
    finally:
        d.quit()
        proc.terminate()
    out = {"explain": args.explain, "threads": args.threads or "all", "memes": len(lat["full"]),
           "cold_stage_cache": True, "warm_up": "one shipped example, not counted"}
    for k, v in lat.items():  # seconds from upload: decision shown, first explanation iteration shown, all done
        if v:
            out[k] = {"p50": round(float(np.percentile(v, 50)), 3), "p95": round(float(np.percentile(v, 95)), 3),
                      "mean": round(float(np.mean(v)), 3)}
    if args.samples:
        out["samples"] = samples
    print(json.dumps(out))
    rec.write(out, args.out)
    return out


def _pick_memes(folder: Path, n: int, skip: set[bytes] = frozenset()) -> list[Path]:
    files, seen = [], set(skip)
    for p in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png")):
        b = p.read_bytes()
        if b not in seen and len(files) < n:
            seen.add(b)
            files.append(p)
    return files


def _start_demo(args, tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DHUMOR_CACHE": str(tmp / "cache.sqlite"), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(ROOT / "app" / "app.py"), "--port", str(port), "--review-log", str(tmp / "r.sqlite"),
           "--explain", args.explain, "--concurrency", str(max(4, args.users or 1))]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "w"))
    url = f"http://127.0.0.1:{port}/"
    for _ in range(1200):
        if proc.poll() is not None:
            sys.exit(f"demo_latency: the demo exited: {(tmp / 'log').read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.2)
    return proc, url


def _one_meme(client, path: Path) -> dict:
    """Upload ``path`` through /analyze and time the streamed outputs (seconds from the request)."""
    from gradio_client import handle_file

    t0, marks = time.perf_counter(), {}
    job = client.submit(handle_file(str(path)), 0.5, api_name="/analyze")
    for out in job:
        now = time.perf_counter() - t0
        texts = [x for x in out if isinstance(x, str)]
        if "decision" not in marks and any(t.startswith("## Decision:") and "pending" not in t for t in texts):
            marks["decision"] = now
        if "first_explanation" not in marks and any("Iteration" in t and "<details>" in t for t in texts):
            marks["first_explanation"] = now
    out = job.outputs()[-1] if job.outputs() else []
    marks["full"] = time.perf_counter() - t0
    status = out[-1] if out else ""
    if not str(status).startswith("Scored in"):
        marks = {"failed": str(status)[:200]}
    return {"meme": path.name, **{k: round(v, 2) if isinstance(v, float) else v for k, v in marks.items()}}


def _stats(samples: list[dict]) -> dict:
    out = {"memes": len([s for s in samples if "failed" not in s]), "failed": len([s for s in samples if "failed" in s])}
    for k in ("decision", "first_explanation", "full"):
        v = [s[k] for s in samples if k in s]
        if v:
            out[k] = {"p50": round(float(np.percentile(v, 50)), 2), "p95": round(float(np.percentile(v, 95)), 2),
                      "mean": round(float(np.mean(v)), 2)}
    return out


def users_main(args, rec) -> dict:
    """1 user, then ``args.users`` at once, each scoring ``args.n`` new memes one after another."""
    from concurrent.futures import ThreadPoolExecutor

    from gradio_client import Client

    folder = Path(args.images)
    if not folder.is_dir():
        print(f"demo_latency: no folder of memes at {args.images}: pass --images DIR", file=sys.stderr)
        sys.exit(2)
    warm = _pick_memes(EXAMPLES_DIR, 1)
    files = _pick_memes(folder, args.n * (1 + args.users), skip={p.read_bytes() for p in warm})
    if len(files) < args.n * (1 + args.users):
        print(f"demo_latency: {folder} has {len(files)} distinct memes; --users {args.users} --n {args.n} needs "
              f"{args.n * (1 + args.users)}", file=sys.stderr)
        sys.exit(2)
    tmp = Path(tempfile.mkdtemp())
    proc, url = _start_demo(args, tmp)
    result = {"explain": args.explain, "threads": args.threads or "all", "memes_per_user": args.n,
              "note": "a CPU shared with other work: compare the rows of one run as ratios, not across runs"}
    try:
        clients = [Client(url, verbose=False) for _ in range(args.users)]
        _one_meme(clients[0], warm[0])  # loads and warms the models; not counted
        plans = {1: [files[: args.n]]}
        rest = files[args.n:]
        plans[args.users] = [rest[u * args.n:(u + 1) * args.n] for u in range(args.users)]
        t_all = time.perf_counter()
        for users, shares in plans.items():
            t0 = time.perf_counter()
            with ThreadPoolExecutor(users) as pool:
                per_user = list(pool.map(lambda cs: [_one_meme(cs[0], f) for f in cs[1]], zip(clients, shares)))
            samples = [s for u in per_user for s in u]
            result[f"users_{users}"] = {**_stats(samples), "wall_s": round(time.perf_counter() - t0, 1),
                                        **({"samples": samples} if args.samples else {})}
        result["total_s"] = round(time.perf_counter() - t_all, 1)
        one, many = result["users_1"], result[f"users_{args.users}"]
        if "first_explanation" in one and "first_explanation" in many:
            result["ratio_first_explanation_p50"] = round(many["first_explanation"]["p50"] /
                                                          one["first_explanation"]["p50"], 2)
            # memes per second, all users together, relative to one user
            result["throughput_ratio"] = round((many["memes"] / many["wall_s"]) / (one["memes"] / one["wall_s"]), 2)
    finally:
        proc.terminate()
        proc.wait(30)
    rec.write(result, args.out)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
