"""Batch scoring of meme folders, manifests and single files: resumable, exactly once, every bad file reported.

The :class:`~dhumor.inference.pipeline.Pipeline` turns items into rows; the scorer decides which items still
need a row, writes each batch to a :class:`~dhumor.inference.results_file.ResultsFile` (whole lines, fsynced)
and sums up. A rerun with the same output skips every id already written, so a run killed at any
moment (SIGKILL included) resumes where it stopped with no row lost or duplicated. Rows that failed
for a transient reason (explanation server, out of memory) are redone by the next run; permanent ones
(the file, its decode, an image the OCR engine cannot read) only with ``retry_errors``. Every row
records its provenance (checkpoint digest, threshold, OCR engine, explainer): a rerun with other
settings is refused rather than mixing two models' rows in one file, unless asked to ``rescore``.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from tqdm.auto import tqdm

from dhumor.errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED
from dhumor.inference.items import Item
from dhumor.inference.results_file import ResultsFile, RowInfo, check_provenance, explanation_error  # noqa: F401

if TYPE_CHECKING:
    from dhumor.inference.pipeline import Pipeline

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

    def count(self, rows: Iterable[dict]) -> None:
        """Count rows written this run (scored, failed and why, failed explanations)."""
        for r in rows:
            if r["error"]:
                self.failed += 1
                self.errors[r["error"].split(":")[0][:80]] += 1
            else:
                self.scored += 1
            self.explanation_failed += bool(r.get("explanation_error"))

    def report(self, source, out) -> int:
        """What `dhumor score` prints when a run ends (stderr; the last line is the JSON summary), on any
        engine; returns the exit code."""
        import sys

        if self.total == 0:
            print(f"dhumor score: no files found in {source}", file=sys.stderr)
        elif self.already_done == self.total and not self.interrupted:
            print(f"dhumor score: nothing to do: all {self.total} memes already have a row in {out}", file=sys.stderr)
        if self.interrupted:
            print(f"dhumor score: interrupted; {self.scored + self.failed} rows written this run are kept. "
                  f"Run the same command again to continue.", file=sys.stderr)
        elif self.failed_in_output:
            print(f"dhumor score: {self.failed_in_output} of {self.total} rows in {out} are errors "
                  f"(see their 'error' / 'explanation_error' fields); exit code {EXIT_ROWS_FAILED}", file=sys.stderr)
        print(json.dumps(self.to_dict()), file=sys.stderr)  # last line: machine-readable summary
        return self.exit_code

    @property
    def exit_code(self) -> int:
        """0 when every item has a clean row; 3 when some rows are errors; 130 when interrupted."""
        if self.interrupted:
            return EXIT_INTERRUPTED
        return EXIT_ROWS_FAILED if self.failed_in_output else EXIT_OK


def _needs_redo(row: RowInfo, retry_errors: bool) -> bool:
    if row.error:
        return retry_errors or row.error_kind == "transient"  # "permanent" (and legacy "input"): only if asked
    return row.explanation_error


def summary_if_done(results: ResultsFile, items: Sequence[Item], index: dict[str, RowInfo],
                    retry_errors: bool) -> ScoreSummary | None:
    """The summary of a run with nothing left to do (every item has a row, none to redo, settings
    checked by the caller), computed from the file alone; None when there is work (a model must load)."""
    if any(it.id not in index or _needs_redo(index[it.id], retry_errors) for it in items):
        return None
    summary = ScoreSummary(total=len(items), already_done=len(items), cache_hits={"features": 0, "computed": 0})
    wanted = {it.id for it in items}
    tally((r for r in results.iter_rows() if r["id"] in wanted), results.schema, results.csv, summary)
    return summary


def _truth(v) -> bool:
    return v is True or v == "True"  # JSONL rows hold booleans, CSV rows read back hold text


def tally(rows: Iterable[dict], schema, csv: bool, summary: ScoreSummary) -> None:
    """Count over result rows (JSONL as written, or CSV read back; one row in memory at a time) into
    ``summary``: failed rows, per-task labels, unfamiliar and abstained memes."""
    counts: dict[str, Counter] = {t.name: Counter() for t in (schema.tasks if schema else [])}
    ok = scored = unf = abst = 0
    for r in rows:
        summary.failed_in_output += bool(r.get("error") or explanation_error(r))
        if r.get("error"):
            continue
        for t in counts:
            label = (r["tasks"][t]["label"] if not csv else r.get(f"{t}_label")) or None
            if label:
                counts[t][label] += 1
        ok += 1
        if csv:
            scored += r.get("ood_score") not in (None, "")
            unf += _truth(r.get("unfamiliar"))
            abst += _truth(r.get("abstain"))
        else:
            scored += bool(r.get("ood"))
            unf += _truth((r.get("ood") or {}).get("unfamiliar"))
            abst += _truth((r.get("decision") or {}).get("abstain"))
    summary.labels = {k: dict(v) for k, v in counts.items()}
    summary.unfamiliar, summary.abstained = unf, abst
    summary.unfamiliar_share = round(unf / scored, 4) if scored else None


def planned_provenance(checkpoint, meta: dict, threshold: float | None, ocr: str, on_unfamiliar: str = "abstain",
                       ood_threshold: float | None = None, abstain_uncertain: bool = False) -> dict:
    """The provenance a run's rows will record (as :meth:`Pipeline.provenance` writes it), from the
    checkpoint's metadata and the flags alone: before any model loads. The explainer is left out (it is
    only known once built)."""
    from dhumor.inference.decision import Decider
    from dhumor.model.checkpoint_meta import checkpoint_digest
    from dhumor.schema import TaskSchema

    decider = Decider.from_meta(TaskSchema.from_dict(meta["schema"]), meta, threshold, on_unfamiliar,
                                abstain_uncertain)
    ood_th = ood_threshold if ood_threshold is not None else (meta.get("ood") or {}).get("threshold")
    return {"checkpoint": checkpoint_digest(checkpoint), "threshold": float(decider.threshold), "ocr": ocr,
            "unfamiliar": {"threshold": None if ood_th is None else float(ood_th),
                           "on_unfamiliar": decider.on_unfamiliar, "uncertain_margin": decider.uncertain_margin}}


def resume(results: ResultsFile, items: Sequence[Item], needs_redo: Callable[[RowInfo], bool],
           stale: Callable[[dict[str, RowInfo]], set[str]] = lambda index: set()) -> tuple[list[Item], int]:
    """Where a run on ``results`` starts, for every command that writes rows (``score``, ``explain``):
    ``(items still to do, rows redone)``. The file is proven to be its own results file, and every row
    read, before a byte of it changes; rows that ``needs_redo`` (or that ``stale`` names, from the index)
    are dropped, for their items to be done again. Items of other runs' rows are left alone."""
    results.lock()
    results.verify()
    index = results.index()  # validates every row; torn last line left out
    stale_ids = stale(index)
    results.repair()
    wanted = {it.id for it in items}
    redo = {i for i, r in index.items() if i in wanted and needs_redo(r)} | stale_ids
    if redo:
        results.drop_ids(redo)
    return [it for it in items if it.id not in index or it.id in redo], len(redo & wanted)


class Scorer:
    """Scores items with a :class:`Pipeline` into a :class:`ResultsFile`."""

    def __init__(self, pipeline: Pipeline, results: ResultsFile, batch_size: int = 16, workers: int = 2,
                 progress: bool = True, threshold: float | None = None):
        self.pipe, self.results = pipeline, results
        self.batch_size, self.workers = max(1, batch_size), max(1, workers)
        self.progress, self.threshold = progress, threshold

    def run(self, items: Sequence[Item], retry_errors: bool = False, rescore: bool = False) -> ScoreSummary:
        """Score the items that have no row yet (and redo those asked for). The file is proven to be a
        results file first, and its rows to be of this run's settings (``rescore``: rows of other
        settings are scored again), before a byte of it changes."""
        summary = ScoreSummary(total=len(items))
        t0 = time.perf_counter()
        todo, summary.redone = resume(
            self.results, items, lambda r: _needs_redo(r, retry_errors),
            stale=lambda index: check_provenance(self.results, index, self.pipe.provenance(self.threshold), rescore))
        wanted = {it.id for it in items}
        summary.already_done = len(items) - len(todo)
        stats0 = dict(vars(self.pipe.extractor.stats))
        bar = tqdm(total=len(todo), desc="scoring", unit="meme", disable=not self.progress or not todo)
        try:
            for rows in self.pipe.run(todo, self.batch_size, self.workers, self.threshold):
                self.results.append(rows)
                summary.count(rows)
                bar.update(len(rows))
        except KeyboardInterrupt:
            summary.interrupted = True  # rows written so far are complete; a rerun continues
        finally:
            bar.close()
        summary.seconds = round(time.perf_counter() - t0, 2)
        st = vars(self.pipe.extractor.stats)
        summary.cache_hits = {"features": st["cached"] - stats0["cached"], "computed": st["computed"] - stats0["computed"]}
        final = (r for r in self.results.iter_rows() if r["id"] in wanted)  # one row in memory at a time
        tally(final, self.pipe.schema, self.results.csv, summary)
        return summary
