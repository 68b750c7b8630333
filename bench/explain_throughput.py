"""Offline explanation throughput, before vs after, measured in ONE run on the same memes.

Configurations (all SmolLM2-135M Q8 GGUF, 3 Role-Reversal iterations, no explanation cache):
  sequential-v1   one answer at a time on llama.cpp (the old default), prompts v1
  batched-v1      llama.cpp, N answers decoded together, iterations of different memes interleaved
  batched-v2      the same with prompts v2 (critique returns only the fields it changes, each field
                  capped at the characters v2's settings say: the default)
  batched-v2-nocap  prompts v2 without the per-field cap (the default before the cap)
  hf-batched-v1   transformers `generate` on the dequantised weights, left-padded batches (--hf)

Memes are a seeded sample of Harm-C *train* (never val), captions from the manifest. Reports
memes/min, completion tokens per meme, tokens/s, parse success (first answer / after repair),
and, per explanation field, the token-length distribution (to size max_tokens).

    DHUMOR_DATA=... nice -n 10 python bench/explain_throughput.py --memes 12 --configs sequential-v1 batched-v1 batched-v2
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import Recorder, results_path  # noqa: E402

from dhumor.cache import StageCache  # noqa: E402
from dhumor.explain import Explainer  # noqa: E402
from dhumor.explain.explainer import VisualCues  # noqa: E402
from dhumor.explain.prompts import Prompts  # noqa: E402
from dhumor.explain.schema import FIELDS  # noqa: E402
from dhumor.images import load_image_with_digest  # noqa: E402
from dhumor.paths import resolve_data_path  # noqa: E402
from dhumor.inference.items import collect_items  # noqa: E402

CONFIGS = ("sequential-v1", "batched-v1", "batched-v2", "batched-v2-nocap", "hf-batched-v1", "hf-batched-v2")


def config_prompts(name: str) -> Prompts:
    """The prompts a configuration names (``...-v2``), without the field cap for ``...-nocap``."""
    parts = name.split("-")
    prompts = Prompts.load(next(p for p in parts if p[:1] == "v" and p[1:].isdigit()))
    if "nocap" in parts:
        prompts = dataclasses.replace(prompts, settings={**prompts.settings, "field_chars": None})
    return prompts


def make_backend(name: str, threads: int, sequences: int):
    if name.startswith("sequential"):
        from dhumor.explain.backends.offline import LlamaCppBackend

        return LlamaCppBackend(n_threads=threads)
    if name.startswith("batched"):
        from dhumor.explain.backends.llama_batch import LlamaBatchBackend

        return LlamaBatchBackend(n_seq=sequences, n_threads=threads)
    if name.startswith("hf-batched"):
        import torch

        from dhumor.explain.backends.offline import TransformersGGUFBackend

        torch.set_num_threads(threads)
        return TransformersGGUFBackend(batch_size=sequences)
    raise ValueError(name)


def measure(name: str, memes, cache: StageCache, args) -> dict:
    backend = make_backend(name, args.threads, args.sequences)
    ex = Explainer(backend, cache=cache, iterations=3, batch_size=args.sequences,
                   prompts=config_prompts(name), max_tokens=args.max_tokens)
    t0 = time.perf_counter()
    res = ex.explain_many([m[1] for m in memes], [m[2] for m in memes], [m[3] for m in memes])
    wall = time.perf_counter() - t0
    its = [it for r in res for it in r.iterations]
    tokens = sum(it.completion_tokens for it in its)
    firsts = [it for it in its if it.raw]
    out = {
        "config": name, "memes": len(memes), "seconds": round(wall, 1),
        "memes_per_minute": round(60 * len(memes) / wall, 2),
        "completion_tokens_per_meme": round(tokens / len(memes), 1),
        "prompt_tokens_per_meme": round(sum(it.prompt_tokens for it in its) / len(memes), 1),
        "tokens_per_second": round(tokens / wall, 1),
        "iterations_per_meme": round(len(its) / len(memes), 2),
        "parse_first_try": round(float(np.mean([not it.repaired and it.error is None for it in firsts])), 3),
        "parse_after_repair": round(float(np.mean([it.error is None for it in its])), 3),
        "memes_ok": sum(r.ok for r in res),
    }
    out["field_tokens"] = field_tokens(res, backend)
    print(json.dumps(out), flush=True)
    return out


def field_tokens(res, backend) -> dict:
    """Per field: tokens of its text in every parsed iteration (p50/p90/p99/max)."""
    tok = getattr(getattr(backend, "llm", None), "tokenize", None)
    count = (lambda s: len(tok(s.encode(), add_bos=False))) if tok else (lambda s: len(s) // 4)
    dist = {f: [] for f in FIELDS}
    for r in res:
        for it in r.iterations:
            for f in FIELDS:
                if it.explanation and it.explanation.get(f):
                    dist[f].append(count(it.explanation[f]))
    return {f: {q: int(np.percentile(v, p)) for q, p in (("p50", 50), ("p90", 90), ("p99", 99))} | {"max": max(v)}
            for f, v in dist.items() if v}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--memes", type=int, default=12)
    ap.add_argument("--baseline-memes", type=int, default=None,
                    help="only the first N of the memes for sequential configs (they are slow); rates stay comparable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--sequences", type=int, default=8, help="answers decoded together (batched configs)")
    ap.add_argument("--max-tokens", type=int, default=400)
    ap.add_argument("--configs", nargs="+", default=["sequential-v1", "batched-v1", "batched-v2"], choices=CONFIGS)
    ap.add_argument("--out", default=str(results_path("explain_throughput")))
    args = ap.parse_args(argv)
    rec = Recorder("explain_throughput")
    items = [it for it in collect_items(resolve_data_path("train.jsonl")) if not it.error]
    random.Random(args.seed).shuffle(items)
    memes = []
    for it in items[: args.memes]:
        img, sha = load_image_with_digest(it.path)
        memes.append((it.id, img, sha, it.caption or ""))
    with tempfile.TemporaryDirectory() as tmp:
        cache = StageCache(Path(tmp) / "cache.sqlite")  # fresh: nothing is reused between runs of this script
        VisualCues(cache=cache)([m[1] for m in memes], [m[2] for m in memes])  # cues once, shared by all configs
        results = [measure(c, memes[: args.baseline_memes] if c.startswith("sequential") else memes, cache, args)
                   for c in args.configs]
    base = next((r for r in results if r["config"].startswith("sequential")), results[0])
    print(f"\nHarm-C train memes (seed {args.seed}), 3 iterations, {args.threads} threads, "
          f"{os.cpu_count()}-core CPU; ratios against {base['config']} measured in this run:")
    for r in results:
        print(f"  {r['config']:<16} {r['memes']:3d} memes {r['memes_per_minute']:6.2f} memes/min ({r['memes_per_minute'] / base['memes_per_minute']:.2f}x)"
              f"  {r['completion_tokens_per_meme']:7.1f} tokens/meme  {r['tokens_per_second']:6.1f} tokens/s"
              f"  parse {r['parse_first_try']:.2f} first / {r['parse_after_repair']:.2f} after repair"
              f"  ok {r['memes_ok']}/{r['memes']}")
    for r in results:
        r["ratio_to_" + base["config"]] = round(r["memes_per_minute"] / base["memes_per_minute"], 2)
    rec.write({"args": vars(args), "results": results}, args.out)


if __name__ == "__main__":
    main()
