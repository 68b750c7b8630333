"""Result files that survive being killed at any moment: one row per meme, exactly once.

Rows are appended as whole lines and fsynced; a run killed mid-write leaves at most a torn last
line, which the next run cuts off (and recomputes) before appending. A row never holds a raw
newline, so "one line = one row" holds for both formats:

- JSONL: standard JSON; a file name's bytes that are not UTF-8 (kept by Python as surrogate
  escapes) are written as ``\\udcXX`` escapes, which ``json.loads`` turns back into the same name.
- CSV: every text field is backslash-escaped (``\\\\``, ``\\n``, ``\\r``, ``\\xHH`` for a byte that is
  not UTF-8), so a file name with a newline or an invalid byte comes back exactly
  (:func:`unescape_text`).

Every row is validated when a file is resumed: a torn or damaged row anywhere in the file is
reported with its line number, never taken as done. One run at a time writes a file: an OS lock
(``flock`` on ``<out>.lock``) is held for the run, and a second run on the same output refuses at
once with a :class:`~dhumor.errors.ConfigError`. (Refusing rather than cooperating: two runs that
split one folder would need to claim rows from each other; ``--shard i/n`` with one output per
shard and ``dhumor merge`` already do that, with no shared file to fight over.)
"""
from __future__ import annotations

import contextlib
from collections import Counter
import csv
import errno
import fcntl
import io
import itertools
import json
import math
import os
import re
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from dhumor.errors import ConfigError
from dhumor.schema import TaskSchema

STAGES = ("decode", "ocr", "explain", "features", "model")
FORMATS = (".jsonl", ".csv")


# ---------------------------------------------------------------- escaping
_SURROGATE = re.compile("[\ud800-\udfff]")
_CSV_SPECIAL = re.compile("[\\\\\n\r\ud800-\udfff]")
_CSV_ESCAPE = re.compile(r"\\(\\|n|r|x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4})")


def _escape_char(c: str) -> str:
    if c == "\\":
        return "\\\\"
    if c == "\n":
        return "\\n"
    if c == "\r":
        return "\\r"
    o = ord(c)
    return f"\\x{o - 0xDC00:02x}" if 0xDC80 <= o <= 0xDCFF else f"\\u{o:04x}"


def escape_text(s: str) -> str:
    """A CSV field's text on one line, reversibly: see :func:`unescape_text`.

    >>> escape_text("a\\nb\\\\c" + "\\udcff")
    'a\\\\nb\\\\\\\\c\\\\xff'
    """
    return _CSV_SPECIAL.sub(lambda m: _escape_char(m.group()), s)


def _unescape_match(m: re.Match) -> str:
    e = m.group(1)
    if e == "\\":
        return "\\"
    if e == "n":
        return "\n"
    if e == "r":
        return "\r"
    if e[0] == "x":
        return chr(0xDC00 + int(e[1:], 16))  # the surrogate escape of that byte
    return chr(int(e[1:], 16))


def unescape_text(s: str) -> str:
    """The exact text :func:`escape_text` was given (a file name's invalid bytes as surrogate escapes).

    >>> unescape_text(escape_text("x\\r\\ny" + "\\udc80")) == "x\\r\\ny" + "\\udc80"
    True
    """
    return _CSV_ESCAPE.sub(_unescape_match, s) if "\\" in s else s


def dumps_row(row: dict) -> str:
    """One JSON line; lone surrogates (a file name's non-UTF-8 bytes) as ``\\uXXXX`` escapes, so the
    line is valid UTF-8 and ``json.loads`` gives back the exact name."""
    text = json.dumps(row, ensure_ascii=False)
    # Surrogates can only occur inside JSON strings, where a \\u escape means the same character.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


# ---------------------------------------------------------------- CSV layout
def _col(c: str) -> str:
    return c.replace(" ", "_").replace("/", "_")


def legacy_csv_columns(schema: TaskSchema) -> list[str]:
    """The CSV columns written before rows recorded their provenance: still read (their settings unknown)."""
    cols = ["id", "path", "sha256", "caption", "caption_source", "flagged", "decision_probability"]
    for t in schema.tasks:
        cols.append(f"{t.name}_label")
        cols += [f"{t.name}_p_{_col(c)}" for c in t.classes]
    return cols + ["explanation", "explanation_error", "error", "error_kind"] + [f"seconds_{s}" for s in STAGES]


# Columns added after the legacy layout, at its end, so that files written before them still read.
DECISION_COLUMNS = ["abstain", "abstain_reason", "ood_score", "unfamiliar"]


def csv_columns(schema: TaskSchema) -> list[str]:
    return legacy_csv_columns(schema) + DECISION_COLUMNS + ["provenance"]


def provenance_key(prov: dict | None) -> str | None:
    """A row's provenance as one canonical JSON text (how CSV stores it; equal settings, equal text)."""
    return None if prov is None else json.dumps(prov, sort_keys=True, separators=(",", ":"))


def explanation_error(row: dict) -> str | None:
    """Why a row's explanation failed (None when it did not fail, or none was asked for).

    Works on scoring rows as written (the explanation's audit trail) and as read back from CSV."""
    if row.get("explanation_error"):
        return row["explanation_error"]
    trail = row.get("explanation_trail")
    if isinstance(trail, dict) and trail.get("status") == "failed":
        return trail.get("error") or trail.get("stop_reason") or "explanation failed"
    return None


def _flat(row: dict, schema: TaskSchema) -> dict:
    out = {k: row.get(k) for k in ("id", "path", "sha256", "caption", "caption_source", "explanation", "error",
                                   "error_kind")}
    out["explanation_error"] = explanation_error(row)
    dec = row.get("decision") or {}
    out["flagged"], out["decision_probability"] = dec.get("flagged"), dec.get("probability")
    out["abstain"], out["abstain_reason"] = dec.get("abstain"), dec.get("reason")
    ood = row.get("ood") or {}
    out["ood_score"], out["unfamiliar"] = ood.get("score"), ood.get("unfamiliar")
    for t in schema.tasks:
        tr = (row.get("tasks") or {}).get(t.name) or {}
        out[f"{t.name}_label"] = tr.get("label")
        for c in t.classes:
            out[f"{t.name}_p_{_col(c)}"] = (tr.get("probs") or {}).get(c)
    for s in STAGES:
        out[f"seconds_{s}"] = (row.get("timings") or {}).get(s)
    prov = row.get("provenance")
    out["provenance"] = provenance_key(prov) if prov is not None else None
    return {k: (escape_text(v) if isinstance(v, str) else v) for k, v in out.items()}


def _is_float(s: str) -> bool:
    try:
        return math.isfinite(float(s))
    except ValueError:
        return False


_SHA256 = re.compile(r"[0-9a-f]{64}")


def _csv_row_problem(row: dict, schema: TaskSchema) -> str | None:
    """Why a CSV row read back is not a complete scoring row (None when it is)."""
    if not row["id"]:
        return "no id"
    if row["error"]:
        return None  # an error row: the reason is all it must hold
    if not _SHA256.fullmatch(row["sha256"]):
        return "sha256 is not 64 hex digits"
    if row["flagged"] not in ("True", "False"):
        return f"flagged is {row['flagged']!r}, not True or False"
    if not _is_float(row["decision_probability"]):
        return f"decision_probability {row['decision_probability']!r} is not a number"
    for t in schema.tasks:
        label = row[f"{t.name}_label"]
        if label not in t.classes and not (t.gate and label == ""):
            return f"{t.name}_label {label!r} is not one of {list(t.classes)}"
        for c in t.classes:
            v = row[f"{t.name}_p_{_col(c)}"]
            if not _is_float(v):
                return f"{t.name}_p_{_col(c)} {v!r} is not a number"
    for s in STAGES:
        v = row[f"seconds_{s}"]
        if v and not _is_float(v):
            return f"seconds_{s} {v!r} is not a number"
    return None


# ---------------------------------------------------------------- the output path and its lock
def check_output_path(path: str | Path, formats: Iterable[str] = FORMATS) -> Path:
    """Refuse an unusable ``--out`` in one line (ConfigError): a folder, a special file, a wrong suffix."""
    path = Path(path)
    formats = tuple(formats)
    wanted = " or ".join(formats)
    if path.is_dir():
        raise ConfigError(f"--out {path}: is a folder; give a file name ending in {wanted}")
    if path.suffix.lower() not in formats:
        got = f"ends in {path.suffix!r}" if path.suffix else "has no suffix"
        raise ConfigError(f"--out {path}: {got}; give a file name ending in {wanted}")
    if path.exists() and not path.is_file():
        raise ConfigError(f"--out {path}: exists and is not a regular file")
    return path


_HELD: dict[str, tuple[int, set[int]]] = {}  # lock file -> (its fd, the claims on it in this process)
_HELD_GUARD = threading.Lock()
_CLAIMS = itertools.count(1)


def output_files(path: str | Path) -> list[Path]:
    """The files a run on ``path`` writes (the output, its lock, its rewrite): never inputs of that run."""
    path = Path(path)
    return [path, path.with_name(path.name + ".lock"), path.with_name(path.name + ".tmp")]


def _lock_file(path: Path) -> str:
    # The file's real path: two names for one file (a symlink, ./x vs x) must meet at one lock.
    real = Path(os.path.realpath(path))
    return str(real.with_name(real.name + ".lock"))


def _holder(lock: str) -> str:
    try:
        pid = Path(lock).read_text().strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def acquire_output_lock(path: str | Path) -> tuple[str, int]:
    """Hold the OS lock of ``path`` for this process (claims within one process share it); ConfigError when
    another process holds it or the place is not writable. Returns the claim for :func:`release_output_lock`."""
    path = Path(path)
    key = _lock_file(path)
    with _HELD_GUARD:
        claim = next(_CLAIMS)
        if key in _HELD:
            _HELD[key][1].add(claim)
            return key, claim
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"--out {path}: cannot create its folder: {e.strerror or e}") from None
        while True:
            try:
                fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise ConfigError(f"--out {path}: cannot write there: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise ConfigError(f"--out {path}: {_holder(key)} is already writing this file; wait for it "
                                      f"to finish (then rerun to resume), or give another --out") from None
                raise ConfigError(f"--out {path}: cannot lock {key}: {e.strerror or e}") from None
            # A run that just finished may have removed the lock file between our open and flock:
            # then we hold a lock nobody else can see; start over on the file that is there now.
            try:
                st, mine = os.stat(key), os.fstat(fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass  # the pid is only for the message a second run prints
        _HELD[key] = (fd, {claim})
        return key, claim


def _unlock(key: str) -> None:
    fd, _ = _HELD.pop(key)
    try:
        os.unlink(key)  # while still locked, so no other run can be holding this file
    except OSError:
        pass
    os.close(fd)


def release_output_lock(claim: tuple[str, int]) -> None:
    """Drop one claim; the OS lock (and its file) goes with the last claim of this process."""
    key, n = claim
    with _HELD_GUARD:
        if key in _HELD and n in _HELD[key][1]:
            _HELD[key][1].discard(n)
            if not _HELD[key][1]:
                _unlock(key)


def release_output_locks() -> None:
    """Release every output lock this process holds (the end of a command, whatever happened in it)."""
    with _HELD_GUARD:
        for key in list(_HELD):
            _unlock(key)


def claim_output(path: str | Path, formats: Iterable[str] = FORMATS) -> tuple[str, int]:
    """Check ``--out`` and take its OS lock for this process, before any model loads, so that a bad path
    or a second run on the same output is refused at once (ConfigError). A later
    :meth:`ResultsFile.lock` on the same path in this process shares the lock; returns the claim."""
    path = check_output_path(path, formats)
    key = acquire_output_lock(path)
    if path.exists():
        try:  # a read-only or immutable file is refused now, not after the first batch
            os.close(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        except OSError as e:
            release_output_lock(key)
            raise ConfigError(f"--out {path}: cannot write to this file: {e.strerror or e}") from None
    return key


class DamagedResultsError(ConfigError):
    """A row of an existing results file that is torn or edited (the message names its line)."""


class ForeignFileError(ConfigError):
    """``--out`` names a file that is not a results file of this kind: it is never changed."""


# The keys every row of a kind has from its first version on: a file whose first row lacks them was not
# written by that command (a manifest, notes, another tool's JSONL), so not a byte of it is touched.
ROW_KEYS = {"score": ("id", "sha256", "tasks", "decision", "error"), "explain": ("id", "status", "iterations")}
_FIRST_LINE_LIMIT = 64 << 20  # a row is far smaller; a longer "first line" is not one of ours


@dataclass(frozen=True)
class RowInfo:
    """What resuming needs of one written row (the row itself is not kept: memory grows with ids only)."""

    error: bool
    error_kind: str | None
    explanation_error: bool
    retry: bool  # an explain row whose server failed
    provenance: str | None  # provenance_key() of the row's settings; None: written before rows recorded them


def row_info(row: dict, provenance: str | None = None) -> RowInfo:
    """What resuming needs of one row as read back (JSONL, CSV or Parquet); ``provenance``: its key, if known."""
    return RowInfo(bool(row.get("error")), row.get("error_kind") or None, bool(explanation_error(row)),
                   bool(row.get("retry")), provenance)


def _first_line(path: Path) -> tuple[bytes, bool]:
    """The file's first line (without its newline) and whether a newline ended it."""
    buf = bytearray()
    with open(path, "rb") as fh:
        while len(buf) < _FIRST_LINE_LIMIT:
            chunk = fh.read(1 << 16)
            if not chunk:
                return bytes(buf), False
            i = chunk.find(b"\n")
            if i >= 0:
                return bytes(buf + chunk[:i]), True
            buf += chunk
    return bytes(buf), False


def check_own(path: str | Path, kind: str = "score", columns: list[str] | None = None,
              legacy_columns: list[str] | None = None) -> None:
    """Refuse (:class:`ForeignFileError`, one line) a ``--out`` that exists and is not a results file of
    ``kind`` ("score" or "explain"): it is read only, never changed. Absent or empty files are fine.

    A JSONL results file starts with a JSON row holding the kind's keys (:data:`ROW_KEYS`); a CSV one
    with the header ``columns`` (or ``legacy_columns``). A first line with no newline yet (a first
    write cut short) must be the start of such a row or header."""
    path = Path(path)
    try:
        if not path.exists() or path.stat().st_size == 0:
            return
        line, whole = _first_line(path)
    except OSError as e:
        raise ConfigError(f"--out {path}: cannot read it: {e.strerror or e}") from None
    what = {"score": "`dhumor score`", "explain": "`dhumor explain`"}[kind]
    foreign = ForeignFileError(f"--out {path}: exists and is not a {what} results file (its first line is not one "
                               f"of its rows); it is left as it is: give a new --out")
    if path.suffix.lower() == ".csv":
        headers = [",".join(c).encode() for c in (columns, legacy_columns) if c]
        if headers and not any(line == h if whole else h.startswith(line) for h in headers):
            raise foreign
        if not headers and kind == "score":  # the schema is not known yet: the columns every schema starts with
            prefix = b"id,path,sha256,caption,caption_source,flagged,decision_probability,"
            if not (line.startswith(prefix) if len(line) >= len(prefix) else prefix.startswith(line) and not whole):
                raise foreign
        return
    try:
        row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        # A first write cut short: only the start of one of our rows ({"id": "...) may be cut and redone.
        if whole or not line.startswith(b'{"id": "'):
            raise foreign from None
        return
    if not isinstance(row, dict) or not all(k in row for k in ROW_KEYS[kind]):
        raise foreign


def check_not_input(out: str | Path, *inputs: str | Path | None) -> None:
    """Refuse an ``--out`` that is (or resolves to) one of the run's inputs: a run never writes what it reads."""
    real = os.path.realpath(out)
    for i in inputs:
        if i is not None and os.path.realpath(i) == real:
            same = "" if os.path.abspath(i) == os.path.abspath(out) else f" (it resolves to {real})"
            raise ConfigError(f"--out {out}: is the input {i}{same}; give another --out")


# ---------------------------------------------------------------- provenance
def describe_provenance(key: str | None) -> str:
    if key is None:
        return "unknown settings (rows written by an older dhumor, which did not record them)"
    p = json.loads(key)
    ex = p.get("explainer")
    ex_text = "no explainer" if not ex else "explainer " + "/".join(
        str(ex.get(k)) for k in ("backend", "model", "prompt_version") if ex.get(k)) + f" x{ex.get('iterations')}"
    text = f"checkpoint {str(p.get('checkpoint'))[:12]}, threshold {p.get('threshold')}, ocr {p.get('ocr')}, {ex_text}"
    un = p.get("unfamiliar")
    if isinstance(un, dict):
        text += (f", unfamiliar above {un.get('threshold')} -> {un.get('on_unfamiliar')}"
                 + (f", abstain within {un['uncertain_margin']} of the threshold" if un.get("uncertain_margin") else ""))
    return text


def check_provenance(results: ResultsFile, index: dict[str, RowInfo], provenance: dict, rescore: bool,
                     fields: tuple[str, ...] | None = None) -> set[str]:
    """The ids whose rows were written with other settings than ``provenance`` (only ``fields`` of it
    compared, when given). ConfigError naming both settings unless ``rescore``; then those ids are to
    be dropped and scored again."""
    def pick(key: str | None) -> str | None:
        if key is None or fields is None:
            return key
        return provenance_key({k: v for k, v in json.loads(key).items() if k in fields})

    mine = pick(provenance_key({k: v for k, v in provenance.items() if fields is None or k in fields}))
    other = {i for i, r in index.items() if pick(r.provenance) != mine}
    if other and not rescore:
        theirs = Counter(index[i].provenance for i in other).most_common(1)[0][0]
        full_mine = provenance_key(provenance)
        raise ConfigError(
            f"--out {results.path}: {len(other)} of its {len(index)} rows were written with "
            f"{describe_provenance(theirs)}; this run uses {describe_provenance(full_mine)}. Give a new --out, "
            f"or pass --rescore to score them again into this file")
    return other


# ---------------------------------------------------------------- the file
class ResultsFile:
    """Append-only JSONL or CSV of scoring rows, keyed by ``id``, written by one run at a time.

    >>> with ResultsFile("out.jsonl", None) as results:        # doctest: +SKIP
    ...     results.verify(); done = results.done_ids(); results.append(rows)
    """

    def __init__(self, path: str | Path, schema: TaskSchema | None, kind: str | None = None):
        """``schema`` names the CSV columns; JSONL rows are free-form (``schema`` may be None, then only
        JSONL is accepted). ``kind``: whose rows ("score", "explain"; default: "score" with a schema,
        else "explain"). Raises ConfigError for an unusable path (a folder, a wrong suffix)."""
        self.path = check_output_path(path, FORMATS if schema is not None else (".jsonl",))
        self.schema = schema
        self.kind = kind or ("score" if schema is not None else "explain")
        self.csv = self.path.suffix.lower() == ".csv"
        self.columns = csv_columns(schema) if schema else []
        self.legacy_columns = legacy_csv_columns(schema) if schema else []
        self._read_columns: list[str] | None = None  # the header of the file as found
        self._lock: tuple[str, int] | None = None
        self._finalizer = None
        self._verified = False

    # ------------------------------------------------------------ the run's lock
    def lock(self) -> "ResultsFile":
        """Take the file's OS lock for this run (idempotent); ConfigError at once if another run holds
        it, or if the file or its folder cannot be written. Writing methods take it themselves."""
        if self._lock is None:
            key = claim_output(self.path, (self.path.suffix.lower(),))
            self._lock = key
            self._finalizer = weakref.finalize(self, release_output_lock, key)
        return self

    def close(self) -> None:
        """Release the lock (also released when the object is collected or the process ends)."""
        if self._finalizer is not None:
            self._finalizer()
        self._lock = self._finalizer = None

    def __enter__(self) -> "ResultsFile":
        return self.lock()

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ identity
    def verify(self) -> "ResultsFile":
        """Prove the file is a results file of this kind (or absent or empty) before anything changes it;
        :class:`ForeignFileError` otherwise (the file is not touched). Every writing method calls it."""
        if not self._verified:
            check_own(self.path, self.kind, self.columns if self.csv else None,
                      self.legacy_columns if self.csv else None)
            self._verified = True
        return self

    # ------------------------------------------------------------ reading / repair
    def repair(self) -> int:
        """Cut a torn last line (a run killed mid-write); returns the bytes removed. Only ever on a file
        :meth:`verify` has recognised as its own."""
        self.lock()
        self.verify()
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

    def _damaged(self, n: int, why: str) -> DamagedResultsError:
        return DamagedResultsError(f"{self.path}:{n}: damaged row ({why}); it is not taken as done. Delete that line "
                        f"(or the file) and rerun to score it again")

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """``(line number, raw line)`` of every complete line, read as a stream (only "\\n" ends a line;
        what follows the last one is torn and left out: :meth:`repair` cuts it). CSV: without the header."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            start = 1
            if self.csv:
                header = fh.readline()
                if not header.endswith(b"\n"):
                    return
                text = header[:-1].decode("utf-8", "replace")
                if text == ",".join(self.columns):
                    self._read_columns = self.columns
                elif text == ",".join(self.legacy_columns):
                    self._read_columns = self.legacy_columns
                else:
                    raise ConfigError(f"{self.path}: its CSV columns are not this checkpoint's (another model's "
                                      f"tasks, or an older dhumor); give another --out")
                start = 2
            for n, raw in enumerate(fh, start):  # binary lines end at b"\n" only
                if raw.endswith(b"\n"):
                    yield n, raw[:-1]

    def _records(self) -> Iterator[tuple[int, bytes, dict]]:
        """``(line number, raw line, row)`` of every row, each validated."""
        for n, raw in self._lines():
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self._damaged(n, "not UTF-8 text") from None
            yield n, raw, self._parse(n, text)

    def _parse(self, n: int, text: str) -> dict:
        if self.csv:
            columns = self._read_columns or self.columns
            fields = next(csv.reader([text]))
            if len(fields) != len(columns):
                raise self._damaged(n, f"{len(fields)} fields, expected {len(columns)}: torn or edited")
            row = {c: unescape_text(v) for c, v in zip(columns, fields)}
            why = _csv_row_problem(row, self.schema)
            if why:
                raise self._damaged(n, why)
            return row
        try:
            row = json.loads(text)
        except json.JSONDecodeError:
            raise DamagedResultsError(f"{self.path}:{n}: not a JSON row (torn or edited); is this a dhumor results file? "
                           f"Delete that line (or the file) and rerun") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str) or not row["id"]:
            raise self._damaged(n, "a JSON row without an id")
        return row

    def iter_rows(self) -> Iterator[dict]:
        """The complete rows, one at a time (JSONL as written; CSV as flat dicts of strings, text unescaped).
        Raises ConfigError naming the line of any damaged row."""
        for _, _, row in self._records():
            yield row

    def rows(self) -> list[dict]:
        """Every complete row in a list (see :meth:`iter_rows`, which holds one row at a time)."""
        return list(self.iter_rows())

    def index(self) -> dict[str, RowInfo]:
        """``{id: RowInfo}`` of every row written, each validated; memory grows with the ids, not the rows
        (a provenance shared by many rows is held once)."""
        out: dict[str, RowInfo] = {}
        seen: dict[str, str] = {}
        for row in self.iter_rows():
            if self.csv:
                prov = row.get("provenance") or None
            else:
                prov = provenance_key(row["provenance"]) if isinstance(row.get("provenance"), dict) else None
            if prov is not None:
                prov = seen.setdefault(prov, prov)
            out[row["id"]] = row_info(row, prov)
        return out

    def done_ids(self) -> dict[str, bool]:
        """``{id: had_error}`` for every row already written."""
        return {i: r.error for i, r in self.index().items()}

    def drop_ids(self, ids: set[str]) -> None:
        """Rewrite the file without the rows of ``ids`` (write-then-rename: never half-written)."""
        self.lock()
        self.verify()
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as fh:
                if self.csv:
                    # The file's own layout while rows of it stay; the current one when none does.
                    kept = any(row["id"] not in ids for _, _, row in self._records())
                    layout = (self._read_columns or self.columns) if kept else self.columns
                    fh.write((",".join(layout) + "\n").encode())
                for _, raw, row in self._records():
                    if row["id"] not in ids:
                        fh.write(raw + b"\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            if self.csv:
                self._read_columns = layout
        except OSError as e:
            tmp.unlink(missing_ok=True)  # the file is as it was; no half-written copy beside it
            raise self._cannot_write(e) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ writing
    def _encode(self, rows: Iterable[dict]) -> str:
        if not self.csv:
            return "".join(dumps_row(r) + "\n" for r in rows)
        buf = io.StringIO()
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        if not fresh and self._read_columns is None:
            for _ in self._lines():  # learn the file's layout from its header
                break
        columns = self.columns if fresh else (self._read_columns or self.columns)
        w = csv.DictWriter(buf, columns, lineterminator="\n", extrasaction="ignore")
        if fresh:
            w.writeheader()
            self._read_columns = self.columns
        w.writerows(_flat(r, self.schema) for r in rows)
        return buf.getvalue()

    def append(self, rows: list[dict]) -> None:
        """Append whole rows and fsync, so a crash never loses an acknowledged row."""
        if not rows:
            return
        self.lock()
        self.verify()
        data = self._encode(rows).encode("utf-8")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise self._cannot_write(e) from None
        try:
            size = os.fstat(fd).st_size  # the lock is held: nobody else appends
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        except OSError as e:
            # A full disk mid-row: cut back to the last whole row, so no half-written row stays.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise self._cannot_write(e) from None
        finally:
            os.close(fd)

    def _cannot_write(self, e: OSError) -> ConfigError:
        return ConfigError(f"{self.path}: cannot write results ({e.strerror or e}): free space or give another "
                           f"--out, then rerun the same command (rows already written are kept)")
