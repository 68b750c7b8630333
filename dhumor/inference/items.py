"""What every command hands the pipeline: one meme to process, from a folder, a manifest or a file.

>>> items = collect_items("examples")                     # doctest: +SKIP
>>> items[0].id, items[0].path.name                       # doctest: +SKIP
('astronaut.jpg', 'astronaut.jpg')
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from dhumor.errors import DataError, InvalidValueError
from dhumor.images import is_image_name

MANIFEST_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".xlsx", ".xlsm", ".xls")


@dataclass
class Item:
    """One meme: an image file, and what is already known about it.

    ``caption`` None means "read it" (OCR, when configured); a string (even empty) is used as is.
    ``explanation`` None means "generate it" (when an explainer is configured).
    ``error`` marks an input known to be unusable before anything is read (a bad manifest row).
    """

    id: str
    path: Path
    caption: str | None = None
    explanation: str | None = None
    error: str | None = None
    labels: dict[str, int] = field(default_factory=dict)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based i) → (i, n)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InvalidValueError(f"--shard takes i/n with 0 <= i < n, got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise InvalidValueError(f"--shard takes i/n with 0 <= i < n, got {spec!r}")
    return i, n


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic by id alone, so every machine agrees whatever order it lists files in."""
    i, n = shard
    return n == 1 or int(hashlib.sha1(item_id.encode("utf-8", "surrogateescape")).hexdigest(), 16) % n == i


def is_single_image(source: Path, format: str = "auto") -> bool:
    """A path that names one image file (not a folder, not a manifest)."""
    return format in ("auto", "folder") and not source.is_dir() and source.suffix.lower() not in MANIFEST_SUFFIXES \
        and (is_image_name(source) or source.is_file())


def collect_items(source: str | Path, format: str = "auto", images: str | Path | None = None,
                  exclude: Sequence[str | Path] = ()) -> list[Item]:
    """Items of one image file (id = its name), a folder (walked recursively; id = relative path; every
    file, an image or an item with the ``error`` that says why not) or a manifest (id = its id; rows
    naming no usable image become items with an ``error``). ``exclude``: files never listed (the
    run's own output inside the folder)."""
    from dhumor.data.readers import read_manifest, walk_folder

    source = Path(source)
    if not source.exists() and not source.is_symlink():
        raise DataError(source, "not found (expected an image file, a folder of memes or a manifest)")
    if source.is_dir():
        return [Item(e.id, e.path, error=e.error) for e in walk_folder(source, exclude)]
    if is_single_image(source, format):
        return [Item(source.name, source)]
    res = read_manifest(source, format, images, skip_bad=True)
    items = [Item(m.id, m.image, m.caption, m.explanation, labels=dict(m.labels)) for m in res.memes]
    used = {it.id for it in items}
    row_ids = _row_ids(source) if res.skipped else {}
    for e in res.skipped:  # rows that name no usable image still get a row each, with the reason
        items.append(Item(_error_row_id(row_ids.get(e.row), Path(e.file).name, e.row, used), Path(e.file),
                          error=e.reason))
    return items


def _error_row_id(declared: str | None, file: str, row: int | None, used: set[str]) -> str:
    """The id of a manifest row that cannot be scored: the id it declares, unless another row has it
    (then, like a row that declares none, ``file:line``), made unique against every id in ``used``."""
    rid = declared if declared and declared not in used else f"{file}:{row}"
    base, n = rid, 1
    while rid in used:  # a meme may be called "val.jsonl:3" too
        n += 1
        rid = f"{base}#{n}"
    used.add(rid)
    return rid


def _row_ids(manifest: Path) -> dict[int, str]:
    """``{line number: id}`` of a JSONL manifest's rows that declare one (so an error row keeps its meme's
    id), counted by the same splitter the reader uses, so the line numbers agree."""
    import json

    from dhumor.data.readers import json_lines

    out: dict[int, str] = {}
    if manifest.suffix.lower() not in (".jsonl", ".json"):
        return out
    try:
        lines = json_lines(manifest.read_bytes())
    except OSError:
        return out
    for n, line in lines:
        try:
            rec = json.loads(line) if line is not None else None
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("id"):
            out[n] = str(rec["id"])
    return out
