"""The stage cache: every pipeline stage's output, keyed by its input's content and its settings.

key = sha256(content digest + canonical JSON of the stage's settings), so changing an encoder,
a prompt version or an OCR engine recomputes exactly what changed, and an interrupted run resumes.
One SQLite file in WAL mode holds everything; each process opens its own connection.

>>> c = StageCache(":memory:")
>>> k = c.key("abc123", {"engine": "rapidocr"})
>>> c.put("ocr", k, b"hello"); c.get("ocr", k)
b'hello'
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

ENV_CACHE = "DHUMOR_CACHE"


def default_cache_path() -> Path:
    """``$DHUMOR_CACHE``, else ``~/.cache/dhumor/cache.sqlite``."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dhumor" / "cache.sqlite"


def fingerprint(settings: dict[str, Any]) -> str:
    """Stable digest of a stage's settings."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


log = logging.getLogger("dhumor")


def _why_unwritable(path: str) -> str | None:
    """What keeps a cache file from being written, from the file system itself (None: nothing known)."""
    p = Path(path)
    where = p if p.exists() else next((a for a in p.parents if a.exists()), None)
    if where is None:
        return None
    try:
        st = os.statvfs(where)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return "read-only file system"
    if p.exists() and not os.access(p, os.W_OK):
        return "the file is not writable (read-only or immutable)"
    if st.f_bavail * st.f_frsize < 64 * 1024:
        return "the disk is full"
    return None
_WARNED: set[tuple[str, str]] = set()  # (cache file, "reads" | "writes"): each fault is reported once per process
_FAULTS = (sqlite3.Error, OSError)
# Another process may hold the file's lock (a long transaction, `sqlite3` left open on BEGIN EXCLUSIVE):
# each attempt waits LOCK_NOTICE_S, then the wait is said out loud and goes on up to LOCK_WAIT_S in all,
# after which the cache is given up for this run (results in memory), never the work it serves.
LOCK_NOTICE_S, LOCK_WAIT_S = 3.0, 60.0


def _is_locked(e: BaseException) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


class StageCache:
    """A persistent key-value store per pipeline stage (thread- and process-safe).

    A cache that cannot be used never stops the work it serves: a file that is not a database, a
    read-only or immutable file or mount, a full disk. The first fault is logged once, naming the
    file and the reason; then the cache goes on in memory for this run (still reading the file when
    only writing fails), so every result is computed and written as usual. ``problem`` holds the
    reason (None while the file works).
    """

    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path is not None else str(default_cache_path())
        self._local = threading.local()
        self._memory: dict[tuple[str, str], bytes] = {}  # results the file could not take
        self._memory_lock = threading.Lock()
        self._read_ok = self._write_ok = self.path != ":memory:"
        self._read_only_uri: str | None = None  # set when the file can be read but never written
        self.problem: str | None = None
        if self._read_ok:
            try:
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
                self._conn()  # find an unusable file now, not in the middle of a batch
            except _FAULTS as e:
                self._open_read_only(e)

    def _open_read_only(self, err: BaseException) -> None:
        """The file cannot be opened for writing: read it as it is when the reason is that nothing can
        write it (read-only mount, immutable file, full disk), else give it up."""
        if _why_unwritable(self.path) and Path(self.path).is_file():
            self._read_only_uri = f"{Path(self.path).resolve().as_uri()}?immutable=1"
            try:
                self._conn().execute("SELECT COUNT(*) FROM entries LIMIT 1").fetchone()
                self._fault(err, reads=False)
                return
            except _FAULTS:
                pass
        self._fault(err, reads=True)

    def _conn(self) -> sqlite3.Connection:
        # One connection per (process, thread): sqlite connections must not cross a fork.
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            if self._read_only_uri:
                # immutable=1: no lock or journal files either, which a read-only or full disk cannot hold
                conn = sqlite3.connect(self._read_only_uri, uri=True, isolation_level=None, check_same_thread=False)
            else:
                conn = sqlite3.connect(self.path, timeout=LOCK_NOTICE_S, isolation_level=None, check_same_thread=False)
                try:
                    self._patiently(lambda: conn.execute("PRAGMA journal_mode=WAL"))
                    conn.execute("PRAGMA synchronous=NORMAL")
                    self._patiently(lambda: conn.execute(
                        "CREATE TABLE IF NOT EXISTS entries (stage TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
                        " created REAL NOT NULL, PRIMARY KEY (stage, key))"
                    ))
                except BaseException:
                    conn.close()
                    raise
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    def _patiently(self, op):
        """``op()``, waiting for another process's lock on the file: said once after LOCK_NOTICE_S, given up
        (the lock error raised, so the caller's fault handling takes over) after LOCK_WAIT_S."""
        t0 = time.monotonic()
        while True:
            try:
                return op()
            except sqlite3.OperationalError as e:
                if not _is_locked(e) or time.monotonic() - t0 >= LOCK_WAIT_S:
                    raise
                if (self.path, "locked") not in _WARNED:
                    _WARNED.add((self.path, "locked"))
                    log.warning("stage cache %s is locked by another process (a transaction held open); waiting up "
                                "to %.0f s, then going on without it", self.path, LOCK_WAIT_S)

    def _fault(self, err: BaseException, reads: bool) -> None:
        """Stop using the file (for reads too when ``reads``), saying so once per file and kind."""
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        why = _why_unwritable(self.path)
        if why and why not in reason:  # SQLite says "disk I/O error" or "unable to open" for these
            reason = f"{reason}: {why}"
        self.problem = reason
        self._write_ok = False
        if reads:
            self._read_ok = False
        kind = "reads" if reads else "writes"
        if (self.path, kind) in _WARNED:
            return
        _WARNED.add((self.path, kind))
        if reads:
            log.warning("stage cache %s cannot be used (%s); continuing without it: results are computed afresh "
                        "and kept in memory for this run only (set DHUMOR_CACHE or --cache to another file)",
                        self.path, reason)
        else:
            log.warning("stage cache %s cannot be written (%s); continuing: what it holds is still read, new "
                        "results are kept in memory for this run only", self.path, reason)

    @staticmethod
    def key(content_digest: str, settings: dict[str, Any]) -> str:
        return hashlib.sha256((content_digest + "\0" + fingerprint(settings)).encode()).hexdigest()

    def get(self, stage: str, key: str) -> bytes | None:
        return self.get_many(stage, [key]).get(key)

    def get_many(self, stage: str, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, bytes] = {}
        if self._memory:
            out.update((k, self._memory[(stage, k)]) for k in keys if (stage, k) in self._memory)
        if not self._read_ok:
            return out
        try:
            conn = self._conn()
            for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[i:i + 500]
                q = f"SELECT key, value FROM entries WHERE stage=? AND key IN ({','.join('?' * len(chunk))})"
                found = self._patiently(lambda: conn.execute(q, (stage, *chunk)).fetchall())
                out.update((k, bytes(v)) for k, v in found if k not in out)
        except _FAULTS as e:
            self._fault(e, reads=True)
        return out

    def put(self, stage: str, key: str, value: bytes) -> None:
        self.put_many(stage, [(key, value)])

    def put_many(self, stage: str, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        if not items:
            return
        if self._write_ok:
            try:
                self._write(stage, items)
                return
            except _FAULTS as e:
                self._fault(e, reads=False)
        with self._memory_lock:
            self._memory.update(((stage, k), bytes(v)) for k, v in items)

    def _write(self, stage: str, items: list[tuple[str, bytes]]) -> None:
        conn = self._conn()
        now = time.time()
        self._patiently(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO entries (stage, key, value, created) VALUES (?, ?, ?, ?)",
                [(stage, k, sqlite3.Binary(v), now) for k, v in items],
            )
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may already have rolled back (a full disk does): a second ROLLBACK would raise
            # "cannot rollback - no transaction is active" and hide the real reason.
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            raise

    def count(self, stage: str | None = None) -> int:
        n = sum(1 for s, _ in list(self._memory) if stage is None or s == stage)
        if not self._read_ok:
            return n
        try:
            if stage is None:
                return n + self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return n + self._conn().execute("SELECT COUNT(*) FROM entries WHERE stage=?", (stage,)).fetchone()[0]
        except _FAULTS as e:
            self._fault(e, reads=True)
            return n

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    # Value codecs: arrays as .npz bytes, records as JSON.
    @staticmethod
    def pack_arrays(**arrays: np.ndarray) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        return buf.getvalue()

    @staticmethod
    def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    @staticmethod
    def pack_json(obj: Any) -> bytes:
        # surrogatepass: a model's answer may carry a lone surrogate ("\\ud800" in its JSON)
        return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode("utf-8", "surrogatepass")

    @staticmethod
    def unpack_json(data: bytes) -> Any:
        return json.loads(data.decode("utf-8", "surrogatepass"))
