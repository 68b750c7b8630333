"""Merging the outputs of ``dhumor score --shard i/n`` runs into one file."""
from __future__ import annotations

import csv
import json
from pathlib import Path

from dhumor.errors import ConfigError, DataError
from dhumor.inference.results_file import (FORMATS, acquire_output_lock, check_not_input, check_output_path,
                                           provenance_key, release_output_lock, unescape_text)
from dhumor.util.files import atomic_write


def _row_id(line: bytes, header: list[str] | None, path: str | Path, n: int) -> tuple[str, str | None]:
    """The exact id of one row (CSV ids unescaped, so two spellings of one name cannot both pass) and its
    provenance (:func:`~dhumor.inference.results_file.provenance_key`; None for a row of an older dhumor);
    ``header``: the CSV's columns (None for JSONL)."""
    try:
        text = line.decode("utf-8")
        if header is not None:
            fields = next(csv.reader([text]))
            if len(fields) != len(header):
                raise TypeError
            prov = unescape_text(fields[header.index("provenance")]) if "provenance" in header else ""
            return unescape_text(fields[0]), prov or None
        row = json.loads(text)
        rid = row["id"]
        if not isinstance(rid, str):
            raise TypeError
        prov = row.get("provenance")
        return rid, provenance_key(prov) if isinstance(prov, dict) else None
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, IndexError, StopIteration):
        raise DataError(path, "damaged row (torn or edited): fix or delete it, or rerun that shard", n) from None


def _settings(key: str | None) -> str:
    from dhumor.inference.results_file import describe_provenance

    return describe_provenance(key)


def merge_results(inputs: list[str | Path], out: str | Path) -> int:
    """Concatenate JSONL (or CSV) shard outputs, refusing an id that appears twice or rows of different
    settings (provenance); write-then-rename."""
    out = check_output_path(out)
    check_not_input(out, *inputs)
    if out.exists() and (out.is_symlink() or out.stat().st_size):  # a merge writes a new file, never over another
        raise ConfigError(f"--out {out}: exists; dhumor merge writes a new file: give another --out (or remove it)")
    suffixes = {Path(p).suffix.lower() for p in inputs} | {out.suffix.lower()}
    if len(suffixes) != 1 or suffixes - set(FORMATS):
        raise DataError(out, "merge inputs and output must all be .jsonl or all .csv")
    csv_mode = out.suffix.lower() == ".csv"
    seen: dict[str, str] = {}
    lines: list[bytes] = []
    header = None
    settings: tuple[str | None, str] | None = None  # the provenance of the first row, and where it is
    for p in inputs:
        try:
            data = Path(p).read_bytes()
        except OSError as e:
            raise DataError(p, f"cannot read: {e.strerror or e}") from None
        if data and not data.endswith(b"\n"):
            raise DataError(p, "ends in a torn line: rerun its `dhumor score` command to finish it first")
        rows = data.split(b"\n")[:-1]  # only "\n" ends a row (a name may hold other line breaks)
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
            columns = next(csv.reader([header.decode("utf-8", "replace")])) if csv_mode else None
            rid, prov = _row_id(line, columns, p, n)
            if settings is None:
                settings = (prov, f"{p}:{n}")
            elif prov != settings[0]:  # one file, one model and one set of settings
                raise DataError(p, f"row {rid!r} was scored with {_settings(prov)}, but {settings[1]} with "
                                   f"{_settings(settings[0])}: rescore one of them (--rescore) before merging", n)
            if rid in seen:
                raise DataError(p, f"id {rid!r} is also in {seen[rid]}: shards overlap", n)
            seen[rid] = str(p)
            lines.append(line)
    key = acquire_output_lock(out)  # no `dhumor score` may be appending to the merged file meanwhile
    try:
        atomic_write(out, ([header + b"\n"] if header is not None else []) + [line + b"\n" for line in lines])
    finally:
        release_output_lock(key)
    return len(lines)
