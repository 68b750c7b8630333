"""Summary of `dhumor explain` outputs: how the Role-Reversal loop behaved and how fast it ran.

    python bench/explain_stats.py outputs/explanations/val.jsonl outputs/explanations/train.jsonl

Writes bench/results/explain_stats.json (``--out``): the statistics per file and over all of them.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from record import Recorder, results_path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+")
    ap.add_argument("--out", default=str(results_path("explain_stats")))
    args = ap.parse_args(argv)
    rec = Recorder("explain_stats")
    per_file = {f: stats([json.loads(l) for l in Path(f).read_text().splitlines() if l.strip()])
                for f in args.files}
    out = stats([json.loads(l) for f in args.files for l in Path(f).read_text().splitlines() if l.strip()])
    print(json.dumps(out, indent=1))
    rec.write({"files": per_file, "all": out}, args.out)
    return out


def stats(rows: list[dict]) -> dict:
    """How the loop behaved over ``rows`` (`dhumor explain` output rows)."""
    its = [it for r in rows for it in r.get("iterations", [])]
    sims = {}
    for r in rows:
        for it in r.get("iterations", []):
            if it.get("similarity") is not None:
                sims.setdefault(it["iteration"], []).append(it["similarity"])
    gen_s = sum(it["seconds"] for it in its)
    tokens = sum(it["completion_tokens"] for it in its)
    out = {
        "memes": len(rows),
        "ok": sum(r["status"] == "ok" for r in rows),
        "failed": sum(r["status"] != "ok" for r in rows),
        "iterations_used": dict(sorted(Counter(len(r.get("iterations", [])) for r in rows).items())),
        "stop_reasons": dict(Counter((r.get("stop_reason") or "").split(" (")[0] for r in rows)),
        "repaired_iterations": sum(bool(it.get("repaired")) for it in its),
        "failed_iterations": sum(bool(it.get("error")) for it in its),
        "mean_similarity_to_previous": {k: round(float(np.mean(v)), 3) for k, v in sorted(sims.items())},
        "completion_tokens_per_meme": round(tokens / max(1, len(rows)), 1),
        "tokens_per_second_per_stream": round(tokens / gen_s, 1) if gen_s else None,
        "generation_seconds_per_meme": round(gen_s / max(1, len(rows)), 1),
    }
    return out


if __name__ == "__main__":
    main()
