"""The moderators' review log: every confirmed or overridden decision, in a local SQLite file.

Each verdict is committed the moment it is recorded (WAL mode), so stopping the app loses nothing.

>>> log = ReviewLog(":memory:")
>>> rid = log.record(sha256="ab" * 32, filename="m.jpg", model_output={"decision": {"flagged": True}},
...                  model_flagged=True, verdict="confirm", note="clearly mocking a disability")
>>> log.rows()[0]["final_flagged"]
1
"""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import sqlite3
import threading
from pathlib import Path

VERDICTS = {"confirm": None, "override: flag": True, "override: do not flag": False}


def default_review_log() -> Path:
    """``$DHUMOR_REVIEW_LOG``, else ``~/.local/share/dhumor/reviews.sqlite``."""
    env = os.environ.get("DHUMOR_REVIEW_LOG")
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share"))
    return base / "dhumor" / "reviews.sqlite"


class ReviewLog:
    def __init__(self, path: str | Path | None = None):
        self.path = str(path) if path is not None else str(default_review_log())
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=30)
        if self.path != ":memory:":
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")  # a recorded verdict survives a crash
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS reviews (id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL,"
            " sha256 TEXT NOT NULL, filename TEXT, checkpoint TEXT, model_output TEXT NOT NULL,"
            " model_flagged INTEGER NOT NULL, threshold REAL, verdict TEXT NOT NULL, final_flagged INTEGER NOT NULL,"
            " note TEXT, moderator TEXT)")

    def record(self, sha256: str, filename: str | None, model_output: dict, model_flagged: bool, verdict: str,
               note: str = "", moderator: str = "", checkpoint: str | None = None, threshold: float | None = None) -> int:
        """Store one verdict (``confirm`` or an override) and return its row id."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; one of {list(VERDICTS)}")
        if not sha256:
            raise ValueError("a review needs the meme's sha256")
        final = model_flagged if VERDICTS[verdict] is None else VERDICTS[verdict]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            cur = self.conn.execute(
                "INSERT INTO reviews (created, sha256, filename, checkpoint, model_output, model_flagged, threshold,"
                " verdict, final_flagged, note, moderator) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (now, sha256, filename, checkpoint, json.dumps(model_output, ensure_ascii=False), int(model_flagged),
                 threshold, verdict, int(final), note or "", moderator or ""))
            return int(cur.lastrowid)

    def rows(self, limit: int | None = None) -> list[dict]:
        q = "SELECT * FROM reviews ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            cur = self.conn.execute(q)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def export_csv(self, out: str | Path) -> Path:
        """All reviews, oldest first, as CSV (write-then-rename)."""
        out = Path(out)
        rows = list(reversed(self.rows()))
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            cols = ["id", "created", "sha256", "filename", "checkpoint", "model_flagged", "threshold", "verdict",
                    "final_flagged", "note", "moderator", "model_output"]
            w = csv.DictWriter(fh, cols, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, out)
        return out
