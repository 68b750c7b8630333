"""Batch scoring of meme folders, manifests and single files: resumable, exactly once, every bad file reported.

The :class:`~dhumor.pipeline.Pipeline` turns items into rows; the scorer decides which items still
need a row, writes each batch to a :class:`~dhumor.results_file.ResultsFile` (whole lines, fsynced)
and sums up. A rerun with the same output skips every id already written, so a run killed at any
moment (SIGKILL included) resumes where it stopped with no row lost or duplicated. Rows that failed
for a transient reason (OCR engine, explanation server, model) are redone by the next run; rows whose
file is unusable only with ``retry_errors``.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

from tqdm.auto import tqdm

from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED
from .items import Item, collect_items, in_shard, parse_shard  # noqa: F401  (re-exported for callers)
from .pipeline import Pipeline
from .results_file import ResultsFile

log = logging.getLogger("dhumor")


@dataclass
class ScoreSummary:
    total: int = 0
    already_done: int = 0
    scored: int = 0
    failed: int = 0  # rows written this run with an error
    explanation_failed: int = 0  # rows written this run whose explanation failed
    redone: int = 0  # rows of an earlier run that were scored again (transient errors, --retry-errors)
    failed_in_output: int = 0  # rows with an error, or a failed explanation, over the whole output
    interrupted: bool = False
    seconds: float = 0.0
    cache_hits: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)  # per task, label counts over the whole output
    unfamiliar: int = 0  # rows of the whole output whose meme is unlike the training memes
    unfamiliar_share: float | None = None  # of the scored rows (None: the checkpoint has no score)
    abstained: int = 0  # rows of the whole output whose decision abstains
    errors: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["errors"] = dict(self.errors)
        return d

    @property
    def exit_code(self) -> int:
        """0 when every item has a clean row; 3 when some rows are errors; 130 when interrupted."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ROWS_FAILED if self.failed_in_output else EXIT_OK


def _needs_redo(row: dict, retry_errors: bool) -> bool:
    if row.get("error"):
        return retry_errors or row.get("error_kind") == "transient"
    return bool(row.get("explanation_error"))


class Scorer:
    """Scores items with a :class:`Pipeline` into a :class:`ResultsFile`."""

    def __init__(self, pipeline: Pipeline, results: ResultsFile, batch_size: int = 16, workers: int = 2,
                 progress: bool = True, threshold: float | None = None):
        self.pipe, self.results = pipeline, results
        self.batch_size, self.workers = max(1, batch_size), max(1, workers)
        self.progress, self.threshold = progress, threshold

    def run(self, items: Sequence[Item], retry_errors: bool = False) -> ScoreSummary:
        summary = ScoreSummary(total=len(items))
        t0 = time.perf_counter()
        self.results.repair()
        wanted = {it.id for it in items}
        previous = {r["id"]: r for r in self.results.rows() if r["id"] in wanted}
        redo = {i for i, r in previous.items() if _needs_redo(r, retry_errors)}
        if redo:
            self.results.drop_ids(redo)
            summary.redone = len(redo)
        todo = [it for it in items if it.id not in previous or it.id in redo]
        summary.already_done = len(items) - len(todo)
        stats0 = dict(vars(self.pipe.extractor.stats))
        bar = tqdm(total=len(todo), desc="scoring", unit="meme", disable=not self.progress or not todo)
        try:
            for rows in self.pipe.run(todo, self.batch_size, self.workers, self.threshold):
                self.results.append(rows)
                for r in rows:
                    if r["error"]:
                        summary.failed += 1
                        summary.errors[r["error"].split(":")[0][:80]] += 1
                    else:
                        summary.scored += 1
                    summary.explanation_failed += bool(r.get("explanation_error"))
                bar.update(len(rows))
        except KeyboardInterrupt:
            summary.interrupted = True  # rows written so far are complete; a rerun continues
        finally:
            bar.close()
        summary.seconds = round(time.perf_counter() - t0, 2)
        st = vars(self.pipe.extractor.stats)
        summary.cache_hits = {"features": st["cached"] - stats0["cached"], "computed": st["computed"] - stats0["computed"]}
        final = [r for r in self.results.rows() if r["id"] in wanted]
        summary.failed_in_output = sum(bool(r.get("error") or r.get("explanation_error")) for r in final)
        summary.labels = self.label_counts(final)
        summary.unfamiliar, summary.unfamiliar_share, summary.abstained = unfamiliar_counts(final)
        return summary

    def label_counts(self, rows: list[dict]) -> dict:
        counts: dict[str, Counter] = {t.name: Counter() for t in self.pipe.schema.tasks}
        for r in rows:
            if r.get("error"):
                continue
            for t in self.pipe.schema.tasks:
                label = (r["tasks"][t.name]["label"] if not self.results.csv else r.get(f"{t.name}_label")) or None
                if label:
                    counts[t.name][label] += 1
        return {k: dict(v) for k, v in counts.items()}


def _truth(v) -> bool:
    return v is True or v == "True"  # JSONL rows hold booleans, CSV rows read back hold text


def unfamiliar_counts(rows: list[dict]) -> tuple[int, float | None, int]:
    """``(unfamiliar, share of scored rows unfamiliar, abstained)`` over result rows (JSONL or CSV read back)."""
    ok = [r for r in rows if not r.get("error")]
    scored = [r for r in ok if (r.get("ood") if "ood" in r else r.get("ood_score") not in (None, ""))]
    unf = sum(_truth((r.get("ood") or {}).get("unfamiliar") if "ood" in r else r.get("unfamiliar")) for r in ok)
    abst = sum(_truth((r.get("decision") or {}).get("abstain") if "decision" in r else r.get("abstain")) for r in ok)
    return unf, (round(unf / len(scored), 4) if scored else None), abst
