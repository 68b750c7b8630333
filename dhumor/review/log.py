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
import io
import json
import os
import sqlite3
import threading
from pathlib import Path

from dhumor.util.files import atomic_write

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
        self._add_columns()

    # Columns added for the review queue (per-task verdicts) and the audit trail (the checkpoint's
    # digest, the row the moderator saw, whether the name is a signed-in user); older logs gain them on open.
    QUEUE_COLUMNS = {"labels": "TEXT", "queue": "TEXT", "item_id": "TEXT", "path": "TEXT", "caption": "TEXT",
                     "checkpoint_digest": "TEXT", "seen": "TEXT", "signed_in": "INTEGER"}

    def _add_columns(self) -> None:
        with self._lock:
            have = {r[1] for r in self.conn.execute("PRAGMA table_info(reviews)")}
            for name, kind in self.QUEUE_COLUMNS.items():
                if name not in have:
                    self.conn.execute(f"ALTER TABLE reviews ADD COLUMN {name} {kind}")
            # Append-only: a verdict is never changed or deleted; a correction is a new verdict.
            for op in ("UPDATE", "DELETE"):
                self.conn.execute(f"CREATE TRIGGER IF NOT EXISTS reviews_no_{op.lower()} BEFORE {op} ON reviews "
                                  f"BEGIN SELECT RAISE(ABORT, 'the review log is append-only: record a new verdict "
                                  f"instead'); END")

    def record(self, sha256: str, filename: str | None, model_output: dict, model_flagged: bool, verdict: str,
               note: str = "", moderator: str = "", checkpoint: str | None = None, threshold: float | None = None,
               labels: dict | None = None, queue: str | None = None, item_id: str | None = None,
               path: str | None = None, caption: str | None = None, checkpoint_digest: str | None = None,
               seen: dict | None = None, signed_in: bool = False) -> int:
        """Store one verdict (``confirm`` or an override) and return its row id.

        ``labels`` (task -> class name, ``None`` for a gated task that does not apply) is the
        moderator's verdict on every task; ``queue``, ``item_id``, ``path`` and ``caption`` (as
        reviewed) tie a queue verdict to its meme so that it can become training data. For the audit:
        ``checkpoint_digest`` names the model exactly, ``seen`` is what the moderator was shown
        (probability, threshold, preset), ``signed_in`` says ``moderator`` is a signed-in user's name."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}; one of {list(VERDICTS)}")
        if not sha256:
            raise ValueError("a review needs the meme's sha256")
        final = model_flagged if VERDICTS[verdict] is None else VERDICTS[verdict]
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        with self._lock:
            cur = self.conn.execute(
                "INSERT INTO reviews (created, sha256, filename, checkpoint, model_output, model_flagged, threshold,"
                " verdict, final_flagged, note, moderator, labels, queue, item_id, path, caption, checkpoint_digest,"
                " seen, signed_in) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (now, sha256, filename, checkpoint, json.dumps(model_output, ensure_ascii=False), int(model_flagged),
                 threshold, verdict, int(final), note or "", moderator or "",
                 json.dumps(labels, ensure_ascii=False) if labels is not None else None, queue, item_id,
                 path, caption, checkpoint_digest, json.dumps(seen, ensure_ascii=False) if seen is not None else None,
                 int(bool(signed_in))))
            return int(cur.lastrowid)

    def rows(self, limit: int | None = None, moderator: str | None = None) -> list[dict]:
        """Reviews, newest first (only ``moderator``'s when given)."""
        q, args = "SELECT * FROM reviews", ()
        if moderator is not None:
            q, args = q + " WHERE moderator = ?", (moderator,)
        q += " ORDER BY id DESC" + (f" LIMIT {int(limit)}" if limit else "")
        with self._lock:
            cur = self.conn.execute(q, args)
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def labelled_rows(self) -> list[dict]:
        """Verdicts that carry per-task labels (from the review queue), oldest first, ``labels`` decoded."""
        with self._lock:
            cur = self.conn.execute("SELECT * FROM reviews WHERE labels IS NOT NULL ORDER BY id")
            cols = [c[0] for c in cur.description]
            out = [dict(zip(cols, r)) for r in cur.fetchall()]
        for r in out:
            r["labels"] = json.loads(r["labels"])
        return out

    def reviewed_shas(self, moderator: str | None = None) -> set[str]:
        """sha256 of every meme with a per-task verdict (by ``moderator`` when given)."""
        q, args = "SELECT DISTINCT sha256 FROM reviews WHERE labels IS NOT NULL", ()
        if moderator is not None:
            q, args = q + " AND moderator = ?", (moderator,)
        with self._lock:
            return {r[0] for r in self.conn.execute(q, args)}

    def export_csv(self, out: str | Path) -> int:
        """All reviews, oldest first, as CSV (write-then-rename); text cells are made inert for
        spreadsheets (:func:`csv_safe`). Returns how many reviews it wrote."""
        out = Path(out)
        rows = [{k: csv_safe(v) for k, v in r.items()} for r in reversed(self.rows())]
        cols = ["id", "created", "sha256", "filename", "checkpoint", "model_flagged", "threshold", "verdict",
                "final_flagged", "note", "moderator", "signed_in", "labels", "queue", "item_id", "path",
                "caption", "checkpoint_digest", "seen", "model_output"]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
        atomic_write(out, buf.getvalue())
        return len(rows)


# A spreadsheet runs a cell that starts with one of these as a formula (CSV injection); tab and
# carriage return too, as some programs strip them before reading the formula.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_safe(value):
    """``value`` for a CSV cell: text that a spreadsheet would read as a formula gets a leading ``'``
    (OWASP's advice), so it is shown, not run. Numbers are left as they are.

    >>> csv_safe("=cmd|' /C calc'!A0"), csv_safe("-1 looks fine"), csv_safe(-1), csv_safe("ok")
    ("'=cmd|' /C calc'!A0", "'-1 looks fine", -1, 'ok')
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
