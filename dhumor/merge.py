"""Merging the outputs of ``dhumor score --shard i/n`` runs into one file."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .errors import DataError


def merge_results(inputs: list[str | Path], out: str | Path) -> int:
    """Concatenate JSONL (or CSV) shard outputs, refusing an id that appears twice; write-then-rename."""
    out = Path(out)
    suffixes = {Path(p).suffix.lower() for p in inputs} | {out.suffix.lower()}
    if len(suffixes) != 1 or suffixes - {".jsonl", ".csv"}:
        raise DataError(out, "merge inputs and output must all be .jsonl or all .csv")
    csv_mode = out.suffix.lower() == ".csv"
    seen: dict[str, str] = {}
    lines: list[str] = []
    header = None
    for p in inputs:
        text = Path(p).read_text(encoding="utf-8")
        rows = text.splitlines()
        if text and not text.endswith("\n"):
            raise DataError(p, "ends in a torn line: rerun its `dhumor score` command to finish it first")
        if csv_mode:
            if not rows:
                continue
            if header is None:
                header = rows[0]
            elif rows[0] != header:
                raise DataError(p, "CSV columns differ from the first input's")
            rows = rows[1:]
        for n, line in enumerate(rows, 2 if csv_mode else 1):
            if not line.strip():
                continue
            rid = json.loads(line)["id"] if not csv_mode else next(csv.reader([line]))[0]
            if rid in seen:
                raise DataError(p, f"id {rid!r} is also in {seen[rid]}: shards overlap", n)
            seen[rid] = str(p)
            lines.append(line)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        if header is not None:
            fh.write(header + "\n")
        fh.writelines(line + "\n" for line in lines)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return len(lines)
