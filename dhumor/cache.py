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


class StageCache:
    """A persistent key-value store per pipeline stage (thread- and process-safe)."""

    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path is not None else str(default_cache_path())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._conn()  # fail early on an unusable path

    def _conn(self) -> sqlite3.Connection:
        # One connection per (process, thread): sqlite connections must not cross a fork.
        conn = getattr(self._local, "conn", None)
        if conn is None or getattr(self._local, "pid", None) != os.getpid():
            conn = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
            if self.path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS entries (stage TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,"
                " created REAL NOT NULL, PRIMARY KEY (stage, key))"
            )
            self._local.conn, self._local.pid = conn, os.getpid()
        return conn

    @staticmethod
    def key(content_digest: str, settings: dict[str, Any]) -> str:
        return hashlib.sha256((content_digest + "\0" + fingerprint(settings)).encode()).hexdigest()

    def get(self, stage: str, key: str) -> bytes | None:
        row = self._conn().execute("SELECT value FROM entries WHERE stage=? AND key=?", (stage, key)).fetchone()
        return None if row is None else bytes(row[0])

    def get_many(self, stage: str, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(dict.fromkeys(keys))
        out: dict[str, bytes] = {}
        conn = self._conn()
        for i in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[i:i + 500]
            q = f"SELECT key, value FROM entries WHERE stage=? AND key IN ({','.join('?' * len(chunk))})"
            out.update((k, bytes(v)) for k, v in conn.execute(q, (stage, *chunk)))
        return out

    def put(self, stage: str, key: str, value: bytes) -> None:
        self.put_many(stage, [(key, value)])

    def put_many(self, stage: str, items: Iterable[tuple[str, bytes]]) -> None:
        items = list(items)
        if not items:
            return
        conn = self._conn()
        now = time.time()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO entries (stage, key, value, created) VALUES (?, ?, ?, ?)",
                [(stage, k, sqlite3.Binary(v), now) for k, v in items],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def count(self, stage: str | None = None) -> int:
        if stage is None:
            return self._conn().execute("SELECT COUNT(*) FROM entries").fetchone()[0]
        return self._conn().execute("SELECT COUNT(*) FROM entries WHERE stage=?", (stage,)).fetchone()[0]

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
        return json.dumps(obj, ensure_ascii=False, sort_keys=True).encode()

    @staticmethod
    def unpack_json(data: bytes) -> Any:
        return json.loads(data.decode())
