"""Which engine decodes SmolLM2 fastest here: llama.cpp or transformers, one answer at a time or
several together. The same explain prompts (Harm-C train captions, seeded), greedy, the same token
budget for every engine, no early stop, all in ONE run. ``--grammar`` adds the explanation's JSON
schema (llama.cpp only: transformers has no grammar), as real explanation runs use it.

    DHUMOR_DATA=... nice -n 10 python bench/explain_engines.py [--prompts 8] [--tokens 64] [--threads 1]
        [--grammar] [--engines llama-seq llama-batch hf-seq hf-batch]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from record import Recorder, results_path  # noqa: E402

from dhumor.explain.backends.base import GenerationRequest  # noqa: E402
from dhumor.explain.prompts import Prompts  # noqa: E402
from dhumor.paths import resolve_data_path  # noqa: E402


def requests_for(n: int, tokens: int, seed: int, grammar: bool) -> list[GenerationRequest]:
    from dhumor.explain.loop import explanation_schema

    rows = [json.loads(line) for line in resolve_data_path("train.jsonl").read_text().splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    p = Prompts.load("v2")
    cues = p.render("image_line_cues", cues="nothing recognisable")
    return [GenerationRequest(p.render("system"), p.render("explain", image_line=cues,
                                                           caption=" / ".join(r["text"].split("\n"))),
                              json_schema=explanation_schema() if grammar else None, max_tokens=tokens,
                              temperature=0.0) for r in rows[:n]]


def engines(threads: int, n: int, which: list[str]):
    import torch

    torch.set_num_threads(threads)
    from dhumor.explain.backends.llama_batch import LlamaBatchBackend
    from dhumor.explain.backends.offline import LlamaCppBackend, TransformersGGUFBackend

    all_ = {"llama-seq": ("llama.cpp, one at a time", lambda: LlamaCppBackend(n_threads=threads)),
            "llama-batch": (f"llama.cpp, {n} together", lambda: LlamaBatchBackend(n_seq=n, n_threads=threads,
                                                                                 stop_at_json_end=False)),
            "hf-seq": ("transformers, one at a time", lambda: TransformersGGUFBackend(batch_size=1)),
            "hf-batch": (f"transformers, {n} together", lambda: TransformersGGUFBackend(batch_size=n))}
    for w in which:
        yield all_[w]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grammar", action="store_true")
    ap.add_argument("--engines", nargs="+", default=["llama-seq", "llama-batch", "hf-seq", "hf-batch"],
                    choices=["llama-seq", "llama-batch", "hf-seq", "hf-batch"])
    ap.add_argument("--out", default=str(results_path("explain_engines")))
    args = ap.parse_args(argv)
    rec = Recorder("explain_engines")
    reqs = requests_for(args.prompts, args.tokens, args.seed, args.grammar)
    results = []
    for name, make in engines(args.threads, args.prompts, args.engines):
        backend = make()
        backend.generate(reqs[:1])  # warm-up (first-call allocations)
        t0 = time.perf_counter()
        gens = backend.generate(reqs)
        wall = time.perf_counter() - t0
        tokens = sum(g.completion_tokens for g in gens)
        r = {"engine": name, "seconds": round(wall, 1), "completion_tokens": tokens,
             "tokens_per_second": round(tokens / wall, 1), "errors": sum(bool(g.error) for g in gens)}
        results.append(r)
        print(json.dumps(r), flush=True)
        del backend
    base = results[0]["tokens_per_second"]
    print(f"\n{args.prompts} prompts x {args.tokens} tokens, greedy, grammar {args.grammar}, {args.threads} thread(s), "
          f"{os.cpu_count()}-core CPU (shared); ratios against llama.cpp one at a time, same run:")
    for r in results:
        print(f"  {r['engine']:<28} {r['tokens_per_second']:7.1f} tokens/s  ({r['tokens_per_second'] / base:.2f}x)")
    for r in results:
        r["ratio_to_first"] = round(r["tokens_per_second"] / base, 2)
    rec.write({"args": vars(args), "results": results}, args.out)


if __name__ == "__main__":
    main()
