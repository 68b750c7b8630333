"""The review queue: serve scored memes to a moderator in the order where a verdict is worth most
(the Gradio tab that shows it is :mod:`dhumor.app.queue_tab`).

A queue is a ``dhumor score`` results file (JSONL), or a folder that is scored into one on the way.
Orders: ``uncertain`` (primary-task probability nearest the threshold first), ``flagged`` (flagged
first, most confident first), ``unfamiliar`` (most unlike the training memes first; rows without an
unfamiliarity score last, nearest the threshold first) and ``random`` (a seeded sample, for audits). Verdicts on every task
of the checkpoint's schema go to the :class:`~dhumor.review.log.ReviewLog` with the reviewer's name, so
progress survives a restart: the queue skips what the reviewer already judged.

>>> rows = [{"id": "a", "decision": {"probability": 0.9, "threshold": 0.5, "flagged": True}},
...         {"id": "b", "decision": {"probability": 0.45, "threshold": 0.5, "flagged": False}}]
>>> [r["id"] for r in order_queue(rows, "uncertain")]
['b', 'a']
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from dhumor.inference.results_file import ResultsFile
from dhumor.errors import InvalidValueError
from dhumor.review.log import ReviewLog
from dhumor.review.export import check_labels
from dhumor.schema import TaskSchema

ORDERS = ("uncertain", "flagged", "unfamiliar", "random")


def order_queue(rows: list[dict], order: str = "uncertain", seed: int = 0, threshold: float | None = None) -> list[dict]:
    """Scored rows in review order (rows without a decision, i.e. errors, are left out).

    ``threshold`` overrides the one each row was decided with (for ``uncertain``)."""
    rows = [r for r in rows if r.get("decision") and not r.get("error")]
    if order == "uncertain":
        def dist(r):
            th = threshold if threshold is not None else r["decision"]["threshold"]
            return abs(r["decision"]["probability"] - th)
        return sorted(rows, key=lambda r: (dist(r), r["id"]))
    if order == "unfamiliar":
        def unfamiliarity(r):
            th = threshold if threshold is not None else r["decision"]["threshold"]
            ood = r.get("ood")
            return (ood is None, -(ood or {}).get("score", 0.0), abs(r["decision"]["probability"] - th), r["id"])
        return sorted(rows, key=unfamiliarity)
    if order == "flagged":
        return sorted(rows, key=lambda r: (not r["decision"]["flagged"], -r["decision"]["probability"], r["id"]))
    if order == "random":
        rows = sorted(rows, key=lambda r: r["id"])  # the permutation must not depend on file order
        return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    raise InvalidValueError(f"unknown queue order {order!r}; one of {list(ORDERS)}")


def queue_file_for(folder: Path, review_log: ReviewLog) -> Path:
    """Where a folder's scores live: beside the review log, named by the folder's absolute path."""
    base = Path(tempfile.gettempdir()) if review_log.path == ":memory:" else Path(review_log.path).parent
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    return base / "queues" / f"{folder.name}-{key}.jsonl"


def load_queue_rows(source: str | Path, pipe=None, review_log: ReviewLog | None = None,
                    progress: bool = False) -> tuple[Path, list[dict]]:
    """``(results file, rows)`` of a results JSONL, or of a folder scored (resumably) with ``pipe``."""
    source = Path(source)
    if source.is_dir():
        if pipe is None or review_log is None:
            raise InvalidValueError(f"{source}: scoring a folder needs a checkpoint")
        from dhumor.inference.items import collect_items
        from dhumor.inference.scoring import Scorer

        out = queue_file_for(source, review_log)
        Scorer(pipe, ResultsFile(out, pipe.schema), progress=progress).run(collect_items(source))
        source = out
    if not source.is_file():
        raise InvalidValueError(f"{source}: no such results file or folder")
    if source.suffix.lower() != ".jsonl":
        raise InvalidValueError(f"{source}: the queue reads a JSONL results file of `dhumor score` (use --out x.jsonl)")
    rows = ResultsFile(source, None, kind="score").rows()
    if rows and "decision" not in rows[0]:
        raise InvalidValueError(f"{source}: not a dhumor results file (rows have no decision)")
    return source.resolve(), rows


class ReviewQueue:
    """One results file in one order, and the reviewers' progress through it (from the review log)."""

    def __init__(self, rows: list[dict], source: str | Path, log: ReviewLog, schema: TaskSchema,
                 order: str = "uncertain", seed: int = 0, threshold: float | None = None):
        missing = [r["id"] for r in rows if r.get("tasks") and set(r["tasks"]) != set(schema.task_names)]
        if missing:
            raise InvalidValueError(f"{source}: rows score other tasks than {schema.task_names} (e.g. {missing[0]!r}); "
                             f"open the queue with the checkpoint that scored it")
        self.rows = order_queue(rows, order, seed, threshold)
        self.by_id = {r["id"]: r for r in self.rows}
        self.source, self.log, self.schema = str(source), log, schema

    def progress(self, reviewer: str) -> tuple[int, int]:
        """``(reviewed by reviewer, total)``."""
        done = self.log.reviewed_shas(reviewer)
        return sum(r["sha256"] in done for r in self.rows), len(self.rows)

    def next_item(self, reviewer: str, skipped: set[str] = frozenset()) -> dict | None:
        done = self.log.reviewed_shas(reviewer)
        return next((r for r in self.rows if r["sha256"] not in done and r["id"] not in skipped), None)


    def record(self, row: dict, labels: dict, reviewer: str, note: str = "", caption: str | None = None,
               checkpoint: str | None = None, **audit) -> int:
        """Validate and store a verdict on every task; returns the review id."""
        if not reviewer.strip():
            raise InvalidValueError("enter your name as reviewer first (verdicts carry it)")
        labels = check_labels(self.schema, labels)
        prim = self.schema.task(self.schema.primary)
        dec = row["decision"]
        final = labels[prim.name] == prim.classes[1]
        out = {k: row.get(k) for k in ("tasks", "decision", "caption", "explanation")}
        return self.log.record(sha256=row["sha256"], filename=Path(row["path"]).name, model_output=out,
                               model_flagged=bool(dec["flagged"]),
                               verdict="confirm" if final == bool(dec["flagged"]) else
                               ("override: flag" if final else "override: do not flag"),
                               note=note, moderator=reviewer.strip(), checkpoint=checkpoint,
                               threshold=dec["threshold"], labels=labels, queue=self.source, item_id=row["id"],
                               path=row["path"], caption=row.get("caption") if caption is None else caption,
                               **audit)


def default_labels(schema: TaskSchema, row: dict) -> dict[str, str]:
    """The model's answer as a starting verdict: each task's label, or its most probable class when gated off."""
    out = {}
    for t in schema.tasks:
        tr = row["tasks"][t.name]
        out[t.name] = tr["label"] or max(tr["probs"], key=tr["probs"].get)
    return out




def queue_candidates(root: str | Path | None) -> dict[str, Path]:
    """What an admin may open under ``root``: its folders and ``.jsonl`` results files (not hidden),
    by name, resolved inside ``root`` (a link out of it is left out)."""
    if root is None:
        return {}
    root = Path(root).resolve()
    out = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith("."):
            continue
        real = p.resolve()
        if not real.is_relative_to(root) or not (real.is_dir() or (real.is_file() and real.suffix == ".jsonl")):
            continue
        out[p.name] = real
    return out
