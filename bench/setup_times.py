"""How long the README's two commands take on a fresh clone: `make examples` (set-up, then scoring the
example memes with the shipped checkpoint), the test set-up (llama.cpp built from source, test tools),
and with ``--test`` the test suite itself (`make test`, what CI runs).

    python bench/setup_times.py [--test] [--ref HEAD]      # writes bench/results/setup_times.json

The clone is of this repository's committed ``--ref`` (uncommitted changes are not in it), in a
temporary folder removed afterwards. pip's download cache is whatever this machine has: the file
records whether it was warm. Data for the tests comes from ``DHUMOR_DATA`` as in CI.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from record import ROOT, Recorder, results_path


def timed(cmd: list[str], cwd: Path, log: Path) -> dict:
    """Run ``cmd`` in ``cwd`` with its output in ``log``; wall seconds and exit code."""
    t0 = time.perf_counter()
    with open(log, "ab") as fh:
        rc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT).returncode
    return {"command": " ".join(cmd), "seconds": round(time.perf_counter() - t0, 1), "exit_code": rc}


def dir_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (links not followed)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def installed_sizes(venv: Path, top: int = 12) -> dict:
    """The venv's size and its largest installed packages, in MB."""
    site = next(venv.glob("lib/python*/site-packages"), None)
    sizes = {}
    if site:
        for d in site.iterdir():
            if d.is_dir() and not d.name.endswith((".dist-info", "__pycache__")):
                sizes[d.name] = dir_bytes(d)
    largest = dict(sorted(sizes.items(), key=lambda kv: -kv[1])[:top])
    return {"venv_mb": round(dir_bytes(venv) / 1e6), "largest_packages_mb": {k: round(v / 1e6) for k, v in largest.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="HEAD", help="the commit to clone")
    ap.add_argument("--test", action="store_true", help="also run `make test` (the whole suite, as CI)")
    ap.add_argument("--log", default=None, help="keep the commands' output here (default: a temporary file)")
    ap.add_argument("--out", default=str(results_path("setup_times")))
    args = ap.parse_args(argv)
    rec = Recorder("setup_times")
    pip_cache = Path(os.environ.get("PIP_CACHE_DIR", Path.home() / ".cache" / "pip"))
    steps = []
    with tempfile.TemporaryDirectory(prefix="dhumor-setup-") as tmp:
        clone = Path(tmp) / "dhumor"
        log = Path(args.log) if args.log else Path(tmp) / "setup.log"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", args.ref], check=True)
        commit = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        plan = [("make examples (set-up + scoring the examples)", ["make", "examples"]),
                ("test set-up (llama.cpp from source, test tools, Ray)", ["make", "setup-dev"])]
        if args.test:
            plan.append(("make test (the suite CI runs)", ["make", "test"]))
        for name, cmd in plan:
            steps.append({"step": name, **timed(cmd, clone, log)})
            if (clone / ".venv").is_dir():
                steps[-1]["installed_after"] = installed_sizes(clone / ".venv")
            print(steps[-1], file=sys.stderr, flush=True)
            if steps[-1]["exit_code"]:
                break
        tail = log.read_text(errors="replace").splitlines()[-15:]
    rec.write({"cloned_commit": commit, "pip_cache_warm": pip_cache.exists() and any(pip_cache.iterdir()),
               "steps": steps, "log_tail": tail}, args.out)
    return 0 if all(s["exit_code"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
