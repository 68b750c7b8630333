"""Moderators' verdicts → a labelled training manifest, with conflicts and inter-reviewer agreement.

Each reviewer's latest verdict on a meme counts (a reviewer may revise). A meme on which two
reviewers disagree on any task is a *conflict*: it is listed, and left out of the manifest unless
``include_conflicts`` (then the most recent verdict wins). Agreement is Cohen's kappa per task over
the memes both reviewers of a pair labelled (scikit-learn's ``cohen_kappa_score``).

The manifest is in the schema's own format, so ``dhumor fit`` reads it like the original data:
HarMeme jsonl for ``harmeme`` (``labels: [harmfulness, target]``), a D-HUMOR csv for ``dhumor``.
Images are named by absolute path; the sha256 of each reviewed file is kept beside it.

>>> from dhumor.review.log import ReviewLog
>>> from dhumor.review.export import export_reviews
>>> report = export_reviews(ReviewLog("reviews.sqlite"), "reviewed.jsonl")    # doctest: +SKIP
>>> report.written, len(report.conflicts)                                     # doctest: +SKIP
(37, 1)
"""
from __future__ import annotations

import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from dhumor.errors import InvalidValueError
from dhumor.review.log import ReviewLog, csv_safe
from dhumor.util.files import file_sha256
from dhumor.schema import PRESETS, TaskSchema, get_schema
from dhumor.util.files import atomic_write


@dataclass
class ExportReport:
    """What an export wrote and what it found."""

    out: str
    schema: str
    written: int = 0
    reviewers: list[str] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)  # {sha256, id, path, verdicts: {reviewer: labels}}
    agreement: list[dict] = field(default_factory=list)  # {reviewers: [a, b], n, kappa: {task: value|None}}
    skipped: list[str] = field(default_factory=list)  # one line per meme left out, with the reason

    def to_dict(self) -> dict:
        return {"out": self.out, "schema": self.schema, "written": self.written, "reviewers": self.reviewers,
                "conflicts": self.conflicts, "agreement": self.agreement, "skipped": self.skipped}


def check_labels(schema: TaskSchema, labels: dict) -> dict:
    """A verdict's labels, validated against ``schema``: every ungated task set, gated tasks set exactly when
    their gate is positive. Returns task -> class name (None for a gated task that does not apply)."""
    out = {}
    for t in schema.tasks:
        v = labels.get(t.name)
        if t.gate is not None and labels.get(t.gate) != schema.task(t.gate).classes[1]:
            out[t.name] = None  # the task does not exist for this meme: never a guess
            continue
        if v is None or v == "":
            raise InvalidValueError(f"the verdict needs a {t.name} label (one of {list(t.classes)})")
        if v not in t.classes:
            raise InvalidValueError(f"unknown {t.name} label {v!r}; one of {list(t.classes)}")
        out[t.name] = v
    if schema.name == "harmeme":  # harmful is derived from harmfulness in HarMeme: they must agree
        want = "no" if out["harmfulness"] == "not harmful" else "yes"
        if out["harmful"] != want:
            raise InvalidValueError(f"harmful = {out['harmful']!r} contradicts harmfulness = {out['harmfulness']!r}")
    return out


def infer_schema(rows: list[dict]) -> TaskSchema:
    """The preset whose tasks are exactly the tasks the verdicts label."""
    keys = {frozenset(r["labels"]) for r in rows}
    for s in PRESETS.values():
        if keys == {frozenset(s.task_names)}:
            return s
    raise InvalidValueError(f"cannot tell the task schema of the verdicts (tasks {sorted(set().union(*keys))}); "
                     f"pass the schema (--task)")


def latest_by_reviewer(rows: list[dict]) -> dict[str, dict[str, dict]]:
    """sha256 -> reviewer -> that reviewer's latest queue verdict (rows oldest first)."""
    out: dict[str, dict[str, dict]] = {}
    for r in rows:
        out.setdefault(r["sha256"], {})[r["moderator"] or "anonymous"] = r
    return out


def agreement(schema: TaskSchema, latest: dict[str, dict[str, dict]]) -> list[dict]:
    """Cohen's kappa per task for every pair of reviewers, over the memes both labelled."""
    from sklearn.metrics import cohen_kappa_score

    reviewers = sorted({m for by in latest.values() for m in by})
    out = []
    for a, b in itertools.combinations(reviewers, 2):
        both = [by for by in latest.values() if a in by and b in by]
        kappa = {}
        for t in schema.tasks:
            pairs = [(by[a]["labels"][t.name], by[b]["labels"][t.name]) for by in both
                     if by[a]["labels"].get(t.name) is not None and by[b]["labels"].get(t.name) is not None]
            ya, yb = [p[0] for p in pairs], [p[1] for p in pairs]
            # kappa is undefined for fewer than two memes or when neither reviewer ever varies
            defined = len(pairs) >= 2 and len(set(ya) | set(yb)) > 1
            kappa[t.name] = round(float(cohen_kappa_score(ya, yb, labels=list(t.classes))), 4) if defined else None
        out.append({"reviewers": [a, b], "n": len(both), "kappa": kappa})
    return out


def _harmeme_record(r: dict, labels: dict) -> dict:
    return {"id": r["item_id"] or r["sha256"][:16], "image": str(r["path"]), "sha256": r["sha256"],
            "text": r["caption"] or "", "labels": [labels["harmfulness"]] + ([labels["target"]] if labels["target"] else []),
            "reviewers": r["_reviewers"], "note": r["note"] or ""}


def _dhumor_record(r: dict, labels: dict) -> dict:
    # D-HUMOR tables name images by post id; an absolute image path is a valid post id for the reader
    return {"post id": str(r["path"]), "Text": r["caption"] or "", "Explanation1": "", "Dark": labels["humor"],
            "Target": labels["target"] or "", "Intensity": labels["intensity"] or "", "sha256": r["sha256"],
            "reviewers": ";".join(r["_reviewers"]), "note": r["note"] or ""}


def _render(schema: TaskSchema, records: list[dict]) -> str:
    if schema.name == "harmeme":
        return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, ["post id", "Text", "Explanation1", "Dark", "Target", "Intensity", "sha256", "reviewers",
                             "note"])
    w.writeheader()
    w.writerows({k: csv_safe(v) for k, v in rec.items()} for rec in records)
    return buf.getvalue()


def parse_time(text: str | None, flag: str = "time"):
    """An ISO date or time (UTC unless it names a zone) as an aware datetime; None for None."""
    import datetime as dt

    if text is None:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidValueError(f"{flag} {text!r}: not an ISO date or time (e.g. 2026-12-01 or 2026-12-01T09:30)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def select_rows(rows: list[dict], users=None, since=None, until=None) -> list[dict]:
    """Verdicts by any of ``users`` (names) recorded in ``[since, until)`` (aware datetimes); None: any."""
    out = []
    for r in rows:
        if users and r["moderator"] not in set(users):
            continue
        t = parse_time(r["created"])
        if (since is not None and t < since) or (until is not None and t >= until):
            continue
        out.append(r)
    return out


def check_export_out(out: str | Path) -> None:
    """Refuse (ConfigError, file untouched) an ``--out`` that exists and is not a manifest an earlier export
    wrote (its rows, or its CSV header, name the ``reviewers``): an export replaces only its own file."""
    out = Path(out)
    if not out.exists() or (out.is_file() and out.stat().st_size == 0):
        return
    try:
        with open(out, "rb") as fh:
            first = fh.readline(1 << 20).decode("utf-8-sig").strip()
        ours = ("reviewers" in json.loads(first)) if first.startswith("{") else ("reviewers" in first.split(","))
    except (OSError, ValueError, TypeError):
        ours = False
    if not out.is_file() or out.is_symlink() or not ours:
        raise InvalidValueError(f"--out {out}: exists and is not a reviewed manifest of `dhumor reviews export`; "
                                f"give another --out (it is left as it is)")


def export_reviews(log: ReviewLog, out: str | Path, include_conflicts: bool = False,
                   schema: str | TaskSchema | None = None, users=None, since=None, until=None) -> ExportReport:
    """Write the queue verdicts of ``log`` as a labelled manifest at ``out`` (write-then-rename);
    ``users``, ``since``, ``until`` keep only those reviewers' verdicts of that time span (see :func:`select_rows`)."""
    out = Path(out)
    rows = log.labelled_rows()
    if not rows:
        raise InvalidValueError(f"{log.path}: no queue verdicts to export (review memes in the demo's queue first)")
    rows = select_rows(rows, users, since, until)
    if not rows:
        raise InvalidValueError(f"{log.path}: no queue verdicts by {', '.join(users) if users else 'anyone'} in that "
                                f"time span (check --user, --since, --until)")
    sch = get_schema(schema) if schema is not None else infer_schema(rows)
    formats = {"harmeme": (".jsonl", _harmeme_record), "dhumor": (".csv", _dhumor_record)}
    if sch.name not in formats:
        raise InvalidValueError(f"no manifest format for task schema {sch.name!r}; one of {sorted(formats)}")
    suffix, make = formats[sch.name]
    if out.suffix.lower() != suffix:
        raise InvalidValueError(f"{out}: a {sch.name} manifest is a {suffix} file")
    latest = latest_by_reviewer(rows)
    report = ExportReport(out=str(out), schema=sch.name, reviewers=sorted({m for by in latest.values() for m in by}))
    report.agreement = agreement(sch, latest)
    records = []
    for sha, by in latest.items():
        newest = max(by.values(), key=lambda r: r["id"])
        distinct = {json.dumps(r["labels"], sort_keys=True) for r in by.values()}
        if len(distinct) > 1:
            report.conflicts.append({"sha256": sha, "id": newest["item_id"], "path": newest["path"],
                                     "verdicts": {m: r["labels"] for m, r in sorted(by.items())}})
            if not include_conflicts:
                continue
        name = newest["path"] or newest["filename"] or sha
        if not newest["path"] or not Path(newest["path"]).is_file():
            report.skipped.append(f"{name}: image file not found (reviewed at {newest['path']!r})")
            continue
        if file_sha256(newest["path"]) != sha:  # the label belongs to the reviewed bytes, not to a new file
            report.skipped.append(f"{name}: the file changed since it was reviewed (sha256 differs)")
            continue
        try:
            labels = check_labels(sch, newest["labels"])
        except ValueError as e:
            report.skipped.append(f"{name}: {e}")
            continue
        records.append(make({**newest, "_reviewers": sorted(by)}, labels))
    if not records:
        raise InvalidValueError(f"{log.path}: every reviewed meme was left out ({len(report.conflicts)} conflicts, "
                         f"{len(report.skipped)} unusable); nothing to write")
    atomic_write(out, _render(sch, records))
    report.written = len(records)
    return report
