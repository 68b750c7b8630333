"""``dhumor explain``: explanations for a folder or manifest into a resumable JSONL.

Each row keeps the whole Role-Reversal audit trail. Results also go through the stage cache, so a
rerun after a kill continues where it stopped, and training or scoring with the same settings
reuses them.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Sequence

from tqdm.auto import tqdm

from dhumor.inference.results_file import ResultsFile
from dhumor.inference.items import Item
from dhumor.inference.prepare import TRANSIENT, preprocess
from dhumor.inference.scoring import resume
from dhumor.explain.explainer import Explainer


@dataclass
class ExplainSummary:
    total: int = 0
    already_done: int = 0
    explained: int = 0
    cached: int = 0
    failed: int = 0  # rows written as failed (server_failures of them are retried by the next run)
    server_failures: int = 0
    retried: int = 0  # rows of an earlier run that had failed for the server's sake, done again
    unreadable: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_seconds: float = 0.0  # summed over requests: concurrent requests to a server each count
    stop_reasons: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["memes_per_minute"] = round(60 * self.explained / self.seconds, 2) if self.seconds and self.explained else None
        # Over the run's wall time: generation_seconds counts overlapping requests more than once.
        d["tokens_per_second"] = round(self.completion_tokens / self.seconds, 1) if self.seconds else None
        return d


def order_items(items: list[Item], order: str, seed: int) -> list[Item]:
    """``input`` keeps the listing order; ``shuffle`` makes any finished prefix a random sample."""
    if order == "shuffle":
        items = list(items)
        random.Random(seed).shuffle(items)
    return items


def run_explain(explainer: Explainer, items: Sequence[Item], out: str, ocr=None, batch_size: int = 8,
                progress: bool = True) -> ExplainSummary:
    """Explain ``items`` into the JSONL ``out``: rows are appended ``batch_size`` at a time as memes
    finish (whole lines, fsynced), so a kill loses only memes in flight. Rows that failed because
    the backend was down are retried by the next run (replaced, never duplicated)."""
    results = ResultsFile(out, None, kind="explain")
    # Rows that failed for the server's sake are redone, but only those of memes this run covers:
    # a rerun with --limit or --shard keeps the others' rows for a later run to redo.
    todo, retried = resume(results, items, lambda r: r.retry)
    s = ExplainSummary(total=len(items), already_done=len(items) - len(todo), retried=retried)
    t0 = time.perf_counter()
    fp = explainer.settings
    order = {it.id: n for n, it in enumerate(items)}
    bar = tqdm(total=len(todo), desc="explaining", unit="meme", disable=not progress or not todo)
    rows: list[dict] = []

    def flush(force: bool = False) -> None:
        if rows and (force or len(rows) >= batch_size):
            results.append(sorted(rows, key=lambda r: order[r["id"]]))
            bar.update(len(rows))
            rows.clear()

    def readable():
        # Decode and OCR as every command does (dhumor.inference.pipeline.preprocess): a file or an OCR failure is
        # that meme's row, the run goes on; a transient one is retried by the next run.
        for it in todo:
            p = preprocess(it, ocr)
            if p.error:
                rows.append({"id": it.id, "path": str(it.path), "sha256": p.sha256, "caption": p.caption,
                             "status": "failed", "error": p.error, "error_kind": p.error_kind, "text": None,
                             "iterations": [], "retry": p.error_kind == TRANSIENT})
                s.unreadable += 1
                continue
            caption = p.caption if p.caption is not None else ""
            yield (it, p.sha256, caption), p.image, p.sha256, caption

    before = explainer.stats["cached"]
    try:
        for (it, sha, caption), r in explainer.explain_stream(readable()):
            rows.append({"id": it.id, "path": str(it.path), "sha256": sha, "caption": caption, **r.to_dict(),
                         "prompt_version": fp["prompts"], "backend": fp["backend"], "retry": r.backend_failed})
            s.explained += r.ok
            s.failed += not r.ok
            s.server_failures += r.backend_failed
            key = r.stop_reason.split(" (")[0].split(";")[0]
            s.stop_reasons[key] = s.stop_reasons.get(key, 0) + 1
            for i in r.iterations:
                s.prompt_tokens += i.prompt_tokens
                s.completion_tokens += i.completion_tokens
                s.generation_seconds += i.seconds
            flush()
    except KeyboardInterrupt:
        s.interrupted = True
    finally:
        flush(force=True)
        bar.close()
    s.cached = explainer.stats["cached"] - before
    s.seconds = round(time.perf_counter() - t0, 2)
    s.generation_seconds = round(s.generation_seconds, 2)
    return s
