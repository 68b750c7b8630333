"""Result files that survive being killed at any moment: one row per meme, exactly once.

Rows are appended as whole lines and fsynced; a run killed mid-write leaves at most a torn last
line, which the next run cuts off (and recomputes) before appending. Text fields never contain a
raw newline (JSON escapes them; CSV stores them as the two characters ``\\n``), so "one line =
one row" holds for both formats.
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Iterable

from .schema import TaskSchema

STAGES = ("decode", "ocr", "explain", "features", "model")


def csv_columns(schema: TaskSchema) -> list[str]:
    cols = ["id", "path", "sha256", "caption", "caption_source", "flagged", "decision_probability"]
    for t in schema.tasks:
        cols.append(f"{t.name}_label")
        cols += [f"{t.name}_p_{c.replace(' ', '_').replace('/', '_')}" for c in t.classes]
    return cols + ["explanation", "explanation_error", "error", "error_kind"] + [f"seconds_{s}" for s in STAGES]


def _flat(row: dict, schema: TaskSchema) -> dict:
    out = {k: row.get(k) for k in ("id", "path", "sha256", "caption", "caption_source", "explanation",
                                   "explanation_error", "error", "error_kind")}
    dec = row.get("decision") or {}
    out["flagged"], out["decision_probability"] = dec.get("flagged"), dec.get("probability")
    for t in schema.tasks:
        tr = (row.get("tasks") or {}).get(t.name) or {}
        out[f"{t.name}_label"] = tr.get("label")
        for c in t.classes:
            out[f"{t.name}_p_{c.replace(' ', '_').replace('/', '_')}"] = (tr.get("probs") or {}).get(c)
    for s in STAGES:
        out[f"seconds_{s}"] = (row.get("timings") or {}).get(s)
    return {k: (v.replace("\r", "").replace("\n", "\\n") if isinstance(v, str) else v) for k, v in out.items()}


class ResultsFile:
    """Append-only JSONL or CSV of scoring rows, keyed by ``id``."""

    def __init__(self, path: str | Path, schema: TaskSchema | None):
        """``schema`` names the CSV columns; JSONL rows are free-form (``schema`` may be None)."""
        self.path = Path(path)
        self.schema = schema
        suffix = self.path.suffix.lower()
        if suffix not in (".jsonl", ".csv") or (suffix == ".csv" and schema is None):
            raise ValueError(f"{self.path}: output must end in .jsonl" + (" or .csv" if schema else ""))
        self.csv = suffix == ".csv"
        self.columns = csv_columns(schema) if schema else []

    # ------------------------------------------------------------ reading / repair
    def repair(self) -> int:
        """Cut a torn last line (a run killed mid-write); returns the bytes removed."""
        if not self.path.exists():
            return 0
        size = self.path.stat().st_size
        if size == 0:
            return 0
        with open(self.path, "rb+") as fh:
            fh.seek(max(0, size - 1))
            if fh.read(1) == b"\n":
                return 0
            # Find the last newline; everything after it is a partial row.
            pos, chunk = size, 1 << 16
            keep = 0
            while pos > 0:
                start = max(0, pos - chunk)
                fh.seek(start)
                data = fh.read(pos - start)
                i = data.rfind(b"\n")
                if i >= 0:
                    keep = start + i + 1
                    break
                pos = start
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
        return size - keep

    def rows(self) -> list[dict]:
        """The complete rows in the file (JSONL as written; CSV as flat dicts of strings)."""
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        if self.csv:
            reader = csv.DictReader(io.StringIO(text))
            if reader.fieldnames and reader.fieldnames != self.columns:
                raise ValueError(f"{self.path}: CSV columns do not match this checkpoint's tasks; use another --out")
            return list(reader)
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ValueError(f"{self.path}:{n}: not a JSON row; is this a dhumor results file?") from None
        return out

    def done_ids(self) -> dict[str, bool]:
        """``{id: had_error}`` for every row already written."""
        return {r["id"]: bool(r.get("error")) for r in self.rows()}

    def drop_ids(self, ids: set[str]) -> None:
        """Rewrite the file without the rows of ``ids`` (write-then-rename: never half-written)."""
        keep = [r for r in self.rows() if r["id"] not in ids]
        tmp = self.path.with_name(self.path.name + ".tmp")
        if self.csv:
            with open(tmp, "w", encoding="utf-8", newline="") as fh:
                w = csv.DictWriter(fh, self.columns, lineterminator="\n")
                w.writeheader()
                w.writerows(keep)
                fh.flush()
                os.fsync(fh.fileno())
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, self.path)

    # ------------------------------------------------------------ writing
    def _encode(self, rows: Iterable[dict]) -> str:
        if not self.csv:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns, lineterminator="\n")
        if not self.path.exists() or self.path.stat().st_size == 0:
            w.writeheader()
        w.writerows(_flat(r, self.schema) for r in rows)
        return buf.getvalue()

    def append(self, rows: list[dict]) -> None:
        """Append whole rows and fsync, so a crash never loses an acknowledged row."""
        if not rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = self._encode(rows).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
