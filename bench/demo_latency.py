"""Demo latency in a real browser: time from upload to the decision on the page, p50 and p95.

Starts `dhumor demo` (cold stage cache), drives Debian's headless Chromium with Selenium, uploads
each meme in a freshly loaded page and waits for the decision to appear.

    python bench/demo_latency.py --n 20                   # memes: --images, default <data root>/images
    python bench/demo_latency.py --images ... --n 20 --explain offline
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests
from dhumor.paths import data_root

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=str(data_root() / "images"),
                    help="a folder of memes (default: the data root's images/)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--explain", default="none")
    ap.add_argument("--checkpoint", default=None)
    args = ap.parse_args(argv)
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    files = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".jpg", ".png"))[: args.n]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp())
    env = {**os.environ, "DHUMOR_CACHE": str(tmp / "cache.sqlite"), "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(ROOT / "app" / "app.py"), "--port", str(port), "--review-log", str(tmp / "r.sqlite"),
           "--explain", args.explain]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(tmp / "log", "w"))
    url = f"http://127.0.0.1:{port}/"
    for _ in range(600):
        try:
            if requests.get(url, timeout=1).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(0.2)
    o = Options()
    o.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking"):
        o.add_argument(a)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=o)
    lat = []
    try:
        for i, f in enumerate([files[0], *files]):  # the first upload warms the models up: not counted
            d.get(url)
            inp = None
            while not inp:
                inp = d.find_elements(By.CSS_SELECTOR, "#meme-input input[type=file]")
                time.sleep(0.05)
            t0 = time.perf_counter()
            inp[0].send_keys(str(f.resolve()))
            failed = False
            while "Decision" not in d.find_element(By.ID, "decision").text:
                # The status is rendered Markdown: its text has no "**" left.
                status = d.find_element(By.ID, "status").text
                if status.startswith(("Cannot use this file", "Something went wrong")):
                    failed = True  # no decision to time: the meme is left out of the latencies
                    break
                time.sleep(0.05)
            if i > 0 and not failed:
                lat.append(time.perf_counter() - t0)
    finally:
        d.quit()
        proc.terminate()
    out = {"explain": args.explain, "memes": len(lat), "p50_seconds": round(float(np.percentile(lat, 50)), 3),
           "p95_seconds": round(float(np.percentile(lat, 95)), 3), "mean_seconds": round(float(np.mean(lat)), 3),
           "machine": f"{platform.machine()}, {os.cpu_count()} cores"}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
