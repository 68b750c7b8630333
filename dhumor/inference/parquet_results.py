"""A Parquet dataset of scoring rows that survives being killed at any moment: one row per meme, exactly once.

The output is a folder (``results.parquet/``) that Spark, DuckDB, pandas and pyarrow read as one table:

- ``part-SSSSSS-GGG.parquet``: one part per written batch (sequence ``S``, generation ``G``). A part
  is written to a hidden temporary name, fsynced and renamed, so a part that is there is whole.
- ``_SUCCESS``: written last, only when every input of the run has a row; removed when a run starts.
- ``_common_metadata``: the schema of the whole dataset (parts may differ where a batch held only
  error rows or a stage was off), written with ``_SUCCESS``.

Columns come from the row dicts themselves (nested dicts → structs; :func:`rows_to_table`), never from
a list kept here, so fields another part of dhumor adds to rows flow through unchanged. An empty
mapping (a row's ``timings`` when nothing ran) is written as null: Parquet has no empty struct.

Rerunning redoes some rows (transient errors): their parts are rewritten without them as the next
generation of the same sequence number before the old generation is removed, so a crash between the
two leaves two generations, of which readers here take the newest (:meth:`repair` removes the other).
Hidden (``.``) and ``_`` files are skipped by every Parquet reader, so temporaries never show up.
One run at a time writes the folder (the same OS lock as the JSONL/CSV results files).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable

from dhumor.errors import ConfigError
from dhumor.inference.results_file import acquire_output_lock

SUFFIX = ".parquet"
SUCCESS = "_SUCCESS"
COMMON_METADATA = "_common_metadata"
_PART = re.compile(r"part-(\d{6,})-(\d{3,})\.parquet")
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_parquet_out(path: str | Path) -> Path:
    """Refuse an unusable ``--out`` for a Parquet dataset in one line (ConfigError)."""
    path = Path(path)
    if path.suffix.lower() != SUFFIX:
        raise ConfigError(f"--out {path}: --engine ray writes a Parquet dataset (a folder); give a name ending in "
                          f"{SUFFIX}, e.g. --out results{SUFFIX}")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a folder (a Parquet dataset is a folder of parts); "
                          f"give another --out")
    if path.is_dir():
        _check_own_dataset(path)
    return path


def _check_own_dataset(path: Path) -> None:
    """A folder that is not a dhumor dataset (other files, parts of another schema) is refused, untouched:
    a run never writes its parts beside someone else's files, nor takes their ids as done."""
    names = sorted(p.name for p in path.iterdir())
    foreign = [n for n in names if not (_PART.fullmatch(n) or n in (SUCCESS, COMMON_METADATA)
                                        or (n.startswith(".") and n.endswith(".tmp")))]
    if foreign:
        raise ConfigError(f"--out {path}: holds files that are not parts of a dhumor dataset (e.g. {foreign[0]!r}); "
                          f"give another --out (nothing in it is changed)")
    parts = [n for n in names if _PART.fullmatch(n)]
    if parts:
        import pyarrow.parquet as pq

        try:
            cols = set(pq.read_schema(path / parts[0]).names)
        except Exception as e:  # not Parquet at all, or torn: never taken for rows
            raise ConfigError(f"--out {path}: {parts[0]} is not a readable Parquet part ({type(e).__name__}); "
                              f"give another --out") from None
        if not {"id", "error"} <= cols:  # keys every row has, error rows included
            raise ConfigError(f"--out {path}: {parts[0]} is not a part of `dhumor score` rows (columns "
                              f"{sorted(cols)[:5]}...); give another --out (nothing in it is changed)")


def _arrow_text(s: str) -> str:
    # Arrow strings are UTF-8; a file name's undecodable bytes (surrogate escapes) become \xNN text.
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") if _SURROGATE.search(s) else s


def arrow_id(item_id: str) -> str:
    """The id as the dataset stores it (equal to the id unless the id holds undecodable bytes)."""
    return _arrow_text(item_id)


def _normalise(v):
    if isinstance(v, dict):
        return {k: _normalise(x) for k, x in v.items()} or None
    if isinstance(v, (list, tuple)):
        return [_normalise(x) for x in v]
    if isinstance(v, str):
        return _arrow_text(v)
    return v


def rows_to_table(rows: list[dict]):
    """An Arrow table whose schema is inferred from the rows (nested dicts → structs, lists → lists)."""
    import pyarrow as pa

    return pa.Table.from_pylist([_normalise(r) for r in rows])


def unify(schemas: Iterable):
    """One schema for parts whose types differ (null vs struct, struct fields present in some parts)."""
    import pyarrow as pa

    schemas = list(schemas)
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except TypeError:  # pyarrow < 14
        return pa.unify_schemas(schemas)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ParquetResults:
    """A folder of Parquet parts keyed by ``id``, written by one run at a time (see the module doc).

    >>> res = ParquetResults("results.parquet").lock()      # doctest: +SKIP
    >>> res.repair(); done = res.rows(); res.append(rows); res.finish()
    """

    def __init__(self, path: str | Path):
        self.path = check_parquet_out(path)
        self._locked = False

    def lock(self) -> "ParquetResults":
        """Take the dataset's OS lock (``<out>.lock`` beside it) for this process; ConfigError if another run holds it."""
        if not self._locked:
            acquire_output_lock(self.path)  # released by release_output_locks() at the end of the command
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise ConfigError(f"--out {self.path}: cannot create the folder: {e.strerror or e}") from None
            if not os.access(self.path, os.W_OK):
                raise ConfigError(f"--out {self.path}: cannot write in this folder")
            self._locked = True
        return self

    # ------------------------------------------------------------ parts
    def _parts(self) -> dict[int, list[tuple[int, Path]]]:
        out: dict[int, list[tuple[int, Path]]] = {}
        for p in self.path.iterdir():
            m = _PART.fullmatch(p.name)
            if m:
                out.setdefault(int(m.group(1)), []).append((int(m.group(2)), p))
        return out

    def parts(self) -> list[Path]:
        """The current part of each sequence number (the newest generation), in order."""
        return [max(gens)[1] for _, gens in sorted(self._parts().items())]

    def repair(self) -> int:
        """Remove what a killed run left: temporaries and superseded generations. Returns the files removed."""
        self.lock()
        removed = 0
        for p in self.path.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp"):
                p.unlink(missing_ok=True)
                removed += 1
        for gens in self._parts().values():
            for _, p in sorted(gens)[:-1]:
                p.unlink(missing_ok=True)
                removed += 1
        return removed

    def _read(self, part: Path) -> list[dict]:
        import pyarrow.parquet as pq

        try:
            return pq.read_table(part).to_pylist()
        except Exception as e:  # a part is renamed into place only when whole: this one was changed since
            raise ConfigError(f"{part}: damaged Parquet part ({type(e).__name__}: {e}); it is not taken as done. "
                              f"Delete it and rerun to score its memes again") from None

    def rows(self) -> list[dict]:
        """Every row of the dataset (dicts as written; a struct field absent from a row reads as None).
        ConfigError when a part is damaged or an id is in two parts."""
        rows, where = [], {}
        for part in self.parts():
            for r in self._read(part):
                if r.get("id") in where:
                    raise ConfigError(f"{self.path}: id {r['id']!r} is in both {where[r['id']].name} and {part.name}; "
                                      f"delete one of them and rerun")
                where[r.get("id")] = part
                rows.append(r)
        return rows

    def _write_part(self, name: str, rows: list[dict]) -> Path:
        import pyarrow.parquet as pq

        final = self.path / name
        tmp = self.path / f".{name}.{os.getpid()}.tmp"
        try:
            pq.write_table(rows_to_table(rows), tmp)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise ConfigError(f"{self.path}: cannot write results ({e.strerror or e}): free space or give another "
                              f"--out, then rerun the same command (parts already written are kept)") from None
        return final

    def append(self, rows: list[dict]) -> Path | None:
        """Write ``rows`` as the next part (whole or not at all)."""
        if not rows:
            return None
        self.lock()
        seq = max(self._parts(), default=0) + 1
        return self._write_part(f"part-{seq:06d}-000.parquet", rows)

    def drop_ids(self, ids: set[str]) -> int:
        """Remove the rows of ``ids`` (each affected part is rewritten as its next generation). Returns rows dropped."""
        self.lock()
        dropped = 0
        for seq, gens in sorted(self._parts().items()):
            gen, part = max(gens)
            rows = self._read(part)
            keep = [r for r in rows if r.get("id") not in ids]
            if len(keep) == len(rows):
                continue
            dropped += len(rows) - len(keep)
            if keep:
                self._write_part(f"part-{seq:06d}-{gen + 1:03d}.parquet", keep)
            part.unlink()
            _fsync_dir(self.path)
        return dropped

    # ------------------------------------------------------------ completion marker
    def start(self) -> None:
        """A run is writing: the dataset is not complete until :meth:`finish`."""
        self.lock()
        (self.path / SUCCESS).unlink(missing_ok=True)

    def finish(self, summary: dict) -> None:
        """Every input has a row: write the dataset's schema and ``_SUCCESS`` (with the run's summary)."""
        import pyarrow.parquet as pq

        parts = self.parts()
        if parts:
            pq.write_metadata(unify(pq.read_schema(p) for p in parts), self.path / COMMON_METADATA)
        tmp = self.path / f".{SUCCESS}.tmp"
        tmp.write_text(json.dumps({"parts": [p.name for p in parts], **summary}) + "\n")
        os.replace(tmp, self.path / SUCCESS)
        _fsync_dir(self.path)

    def complete(self) -> bool:
        return (self.path / SUCCESS).is_file()


def read_dataset(path: str | Path):
    """The whole dataset as one Arrow table with the unified schema (what a data team would load)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    res = ParquetResults(path)
    tables = [pq.read_table(p) for p in res.parts()]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="permissive")
