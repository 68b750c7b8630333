"""Feeding explanations written by ``dhumor explain`` to the reasoning stream."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

from dhumor.errors import DataError
from dhumor.schema import Meme

log = logging.getLogger("dhumor")


def read_explanations(path: str | Path) -> dict[str, dict]:
    """Rows of an explanations JSONL keyed by meme id and by image sha256 (failed rows are skipped)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "explanations file not found (write it with `dhumor explain`)")
    by_key: dict[str, dict] = {}
    from dhumor.data.readers import json_lines

    for n, line in json_lines(path.read_bytes()):  # the one JSON-lines splitter ("\n" only)
        if line is None:
            raise DataError(path, "not UTF-8 text", n)
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg}", n) from None
        if row.get("status") != "ok":
            continue
        for k in (row.get("id"), row.get("sha256")):
            if k:
                by_key[str(k)] = row
    return by_key


def explanation_text(row: dict, iteration: int = -1) -> str | None:
    """The rendered explanation of one iteration (1-based; -1 = the final one)."""
    its = row.get("iterations") or []
    if iteration == -1 or not its:
        return row.get("text")
    if not 1 <= iteration <= len(its):
        # The loop stopped early: its last iteration is what iteration N would have been.
        return its[-1].get("text")
    return its[iteration - 1].get("text")


def attach_explanations(memes: Sequence[Meme], path: str | Path, iteration: int = -1) -> int:
    """Set ``meme.explanation`` from an explanations file (matched by id, then by image sha256); returns matches."""
    from dhumor.images import read_image_bytes, sha256_bytes

    rows = read_explanations(path)
    found = 0
    for m in memes:
        row = rows.get(m.id)
        if row is None and m.image is not None:
            try:
                row = rows.get(sha256_bytes(read_image_bytes(m.image)))
            except DataError:
                row = None
        m.explanation = explanation_text(row, iteration) if row else None
        found += row is not None
    log.info("explanations: %d of %d memes matched in %s", found, len(memes), path)
    return found


def explanations_source(path: str | Path, iteration: int = -1) -> dict:
    """What generated an explanations file, for a checkpoint's ``reasoning_source``: the backend, model
    and prompt version its rows name (the most common value where shards differ) and the iteration used."""
    from collections import Counter

    rows = list({id(r): r for r in read_explanations(path).values()}.values())

    def most_common(values):
        values = [v for v in values if v is not None]
        return Counter(values).most_common(1)[0][0] if values else None

    backends = [r.get("backend") if isinstance(r.get("backend"), dict) else {"backend": r.get("backend")}
                for r in rows]
    return {"kind": "explanations", "file": str(path), "backend": most_common(b.get("backend") for b in backends),
            "model": most_common(b.get("model") for b in backends),
            "prompt_version": most_common(r.get("prompt_version") for r in rows), "iteration": iteration}
