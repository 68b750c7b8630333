"""Every bench under bench/ still imports and parses its arguments: a rerun of a published number
must not die on an import that a refactor removed (bench/ood_eval.py once did)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHES = sorted(p for p in (ROOT / "bench").glob("*.py") if "def main" in p.read_text(encoding="utf-8"))


@pytest.mark.parametrize("bench", BENCHES, ids=[p.stem for p in BENCHES])
def test_bench_help_runs(bench):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, str(bench), "--help"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, f"{bench.name} --help: {r.stderr[-1500:]}"
    assert "usage:" in r.stdout
