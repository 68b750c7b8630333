"""Readers: D-HUMOR tables, HarMeme jsonl and plain image folders, all into :class:`~dhumor.schema.Meme`.

Every bad row raises a :class:`~dhumor.errors.DataError` naming the file, the row and the reason;
with ``skip_bad=True`` the row is skipped and the error kept in :attr:`ReadResult.skipped`.

>>> from dhumor.data.readers import read_manifest
>>> r = read_manifest("data/harmeme-c/val.jsonl")                     # doctest: +SKIP
>>> len(r.memes), r.memes[0].labels                                     # doctest: +SKIP
(177, {'harmful': 0, 'harmfulness': 0, 'target': -1})
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from dhumor.errors import DataError, InvalidValueError
from dhumor.images import IMAGE_EXTENSIONS, is_image_name
from dhumor.schema import DHUMOR, HARMEME, MISSING, Meme

Format = Literal["auto", "harmeme", "dhumor", "folder"]


@dataclass
class ReadResult:
    """Memes read, and the rows skipped (only with ``skip_bad``), each with its reason."""

    memes: list[Meme]
    skipped: list[DataError] = field(default_factory=list)
    schema_name: str | None = None  # the label space the file carries (None for a plain folder)


class _Collector:
    """Applies the skip-bad policy to each row's outcome in one place."""

    def __init__(self, skip_bad: bool):
        self.skip_bad, self.result = skip_bad, ReadResult([])

    def add(self, make: Callable[[], Meme | None]) -> None:
        try:
            meme = make()
        except DataError as e:
            if not self.skip_bad:
                raise
            self.result.skipped.append(e)
            return
        if meme is not None:
            self.result.memes.append(meme)


def _check_image(path: Path, file: Path, row: int) -> Path:
    if not path.exists():
        raise DataError(file, f"image not found: {path}", row)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(file, f"image is an empty file: {path}", row)
    return path


def _check_unique(memes: list[Meme], file: Path) -> None:
    seen: dict[str, str] = {}
    for m in memes:
        if m.id in seen:
            raise DataError(file, f"duplicate id {m.id!r} (also at {seen[m.id]})", int(m.source.rsplit(":", 1)[-1]))
        seen[m.id] = m.source


# ---------------------------------------------------------------- HarMeme jsonl
def read_harmeme_jsonl(path: str | Path, images: str | Path | None = None, skip_bad: bool = False) -> ReadResult:
    """HarMeme jsonl: ``{"id", "image", "labels": [harmfulness, target?], "text"}``; ``labels`` optional."""
    path = Path(path)
    images_dir = Path(images) if images else _default_images_dir(path)
    harmful, harmfulness, target = (HARMEME.task(n) for n in ("harmful", "harmfulness", "target"))
    lines = read_json_lines(path)
    col = _Collector(skip_bad)

    def parse(row: int, line: str | None) -> Meme | None:
        if line is None:
            raise DataError(path, "not UTF-8 text", row)
        if not line.strip():
            return None
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(path, f"invalid JSON: {e.msg}", row) from None
        if not isinstance(rec, dict):
            raise DataError(path, "a row must be a JSON object", row)
        image_name = rec.get("image") or rec.get("img")
        if not image_name:
            raise DataError(path, "row has no 'image' field", row)
        mid = str(rec.get("id") or Path(image_name).stem)
        labels = {t: MISSING for t in HARMEME.task_names}
        raw = rec.get("labels")
        if raw:
            if isinstance(raw, str):
                raw = [raw]
            level = _norm(raw[0])
            try:
                labels["harmfulness"] = harmfulness.index(level)
            except KeyError as e:
                raise DataError(path, str(e.args[0]), row) from None
            labels["harmful"] = harmful.index("no" if level == "not harmful" else "yes")
            if len(raw) > 1 and labels["harmful"] == 1:  # a target only exists for a harmful meme
                try:
                    labels["target"] = target.index(_norm(raw[1]))
                except KeyError as e:
                    raise DataError(path, str(e.args[0]), row) from None
        img = _check_image(images_dir / image_name, path, row)
        text = rec.get("text")
        return Meme(id=mid, image=img, caption=text if isinstance(text, str) else None,
                    explanation=rec.get("explanation"), labels=labels, source=f"{path}:{row}")

    for row, line in lines:
        col.add(lambda row=row, line=line: parse(row, line))
    _check_unique(col.result.memes, path)
    col.result.schema_name = HARMEME.name
    return col.result


# ---------------------------------------------------------------- D-HUMOR tables
_DHUMOR_COLUMNS = {"id": "post id", "text": "Text", "explanation": "Explanation1",
                   "humor": "Dark", "target": "Target", "intensity": "Intensity"}

_CLASS_ALIASES = {
    "humor": {"no": "no", "yes": "yes", "not dark": "no", "dark": "yes", "false": "no", "true": "yes",
              "non dark": "no", "non-dark": "no"},
    "target": {"gender": "gender/sex", "sex": "gender/sex", "gender/sex": "gender/sex", "gender and sex": "gender/sex",
               "sexual": "gender/sex", "mental health": "mental health", "mental illness": "mental health",
               "disability": "disability", "disabilities": "disability", "race": "race/ethnicity",
               "ethnicity": "race/ethnicity", "race/ethnicity": "race/ethnicity", "racism": "race/ethnicity",
               "violence": "violence/death", "death": "violence/death", "violence/death": "violence/death",
               "other": "other", "others": "other"},
    "intensity": {"mild": "mild", "moderate": "moderate", "severe": "severe"},
}


def read_dhumor_table(path: str | Path, images: str | Path | None = None, skip_bad: bool = False,
                      label_base: Literal["auto", 0, 1] = "auto") -> ReadResult:
    """D-HUMOR xlsx/csv: ``post id, Text, Explanation1, Dark, Target, Intensity``; images named by post id.

    Class codes may be 0- or 1-based integers or class names; ``label_base="auto"`` decides per
    column from the codes of the rows the column applies to (a 0 means 0-based; the class count
    means 1-based), and refuses to guess when neither appears.
    """
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "empty file")
    try:
        if path.suffix.lower() in (".xlsx", ".xlsm", ".xls"):
            df = pd.read_excel(path, dtype=object)
        else:
            df = pd.read_csv(path, dtype=object, keep_default_na=True)
    except Exception as e:
        raise DataError(path, f"cannot read table: {e}") from None
    if df.empty:
        raise DataError(path, "empty file: no rows")
    cols = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in ("post id",) if c not in cols]
    if missing:
        raise DataError(path, f"missing column(s) {missing}; found {list(df.columns)}")
    get = lambda rec, key: _cell(rec.get(cols.get(_DHUMOR_COLUMNS[key].lower())))  # noqa: E731
    images_dir = Path(images) if images else _default_images_dir(path)
    records = df.to_dict("records")
    row_of = lambda i: i + 2  # noqa: E731 -- spreadsheet row numbers: header is row 1

    bases = _column_bases(records, get, label_base, path)
    col = _Collector(skip_bad)

    def parse(i: int, rec: dict) -> Meme:
        row = row_of(i)
        mid = get(rec, "id")
        if mid is None:
            raise DataError(path, "empty 'post id'", row)
        mid = str(mid).strip()
        if mid.endswith(".0") and mid[:-2].isdigit():  # Excel turns 12 into 12.0
            mid = mid[:-2]
        labels = {t: MISSING for t in DHUMOR.task_names}
        labels["humor"] = _parse_label(get(rec, "humor"), "humor", bases["humor"], path, row)
        if labels["humor"] == 1:
            for task in ("target", "intensity"):
                labels[task] = _parse_label(get(rec, task), task, bases[task], path, row)
        img = _check_image(_find_image(images_dir, mid, path, row), path, row)
        text, expl = get(rec, "text"), get(rec, "explanation")
        return Meme(id=mid, image=img, caption=None if text is None else str(text),
                    explanation=None if expl is None else str(expl), labels=labels, source=f"{path}:{row}")

    for i, rec in enumerate(records):
        col.add(lambda i=i, rec=rec: parse(i, rec))
    _check_unique(col.result.memes, path)
    col.result.schema_name = DHUMOR.name
    return col.result


def _column_bases(records: list[dict], get: Callable, label_base, path: Path) -> dict[str, int]:
    """Each label column's code base (0 or 1), from the rows it applies to: target and intensity codes only
    count on dark rows (a non-dark row may carry a 0 meaning "none" in 1-based files)."""
    humor_raw = [get(r, "humor") for r in records]
    n_humor = DHUMOR.task("humor").num_classes
    bases = {"humor": int(label_base) if label_base != "auto"
             else _detect_base(humor_raw, n_humor, path, _DHUMOR_COLUMNS["humor"])}
    dark = [_is_positive(h, bases["humor"]) for h in humor_raw]
    ambiguous: dict[str, DataError] = {}
    for task in ("target", "intensity"):
        if label_base != "auto":
            bases[task] = int(label_base)
            continue
        vals = [get(r, task) for r, d in zip(records, dark) if d]
        try:
            bases[task] = _detect_base(vals, DHUMOR.task(task).num_classes, path, _DHUMOR_COLUMNS[task])
        except DataError as e:
            ambiguous[task] = e
    for task, err in ambiguous.items():
        # Target and intensity follow one convention in a file: an ambiguous one takes the other's base.
        # (Not the binary Dark column's: 0/1 is natural for a yes/no column whatever the convention.)
        other = "intensity" if task == "target" else "target"
        if other not in bases:
            raise err
        bases[task] = bases[other]
    return bases


def _cell(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, str) and not v.strip():
        return None
    return v


def _as_int(v) -> int | None:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d+(\.0+)?\s*", v):
        return int(float(v))
    return None


def _is_positive(v, base: int) -> bool:
    n = _as_int(v)
    if n is not None:
        return n - base == 1
    return v is not None and _CLASS_ALIASES["humor"].get(_norm(str(v))) == "yes"


def _detect_base(values: Iterable, n: int, path: Path, column: str) -> int:
    codes = {c for c in (_as_int(v) for v in values) if c is not None}
    if not codes:
        return 0  # names only (or empty): the base does not matter
    if 0 in codes:
        return 0
    if n in codes:
        return 1
    raise DataError(path, f"column {column!r}: codes {sorted(codes)} could be 0- or 1-based; "
                          f"pass label_base=0 or 1 (--label-base)")


def _parse_label(value, task: str, base: int, path: Path, row: int) -> int:
    t = DHUMOR.task(task)
    if value is None:
        raise DataError(path, f"empty {_DHUMOR_COLUMNS[task]!r} label", row)
    n = _as_int(value)
    if n is not None:
        idx = n - base
        if not 0 <= idx < t.num_classes:
            raise DataError(path, f"{_DHUMOR_COLUMNS[task]!r} code {n} is out of range for {t.num_classes} "
                                  f"classes ({base}-based)", row)
        return idx
    name = _CLASS_ALIASES[task].get(_norm(str(value)))
    if name is None:
        raise DataError(path, f"unknown {_DHUMOR_COLUMNS[task]!r} label {value!r}; expected one of "
                              f"{list(t.classes)} or a class code", row)
    return t.index(name)


def _find_image(images_dir: Path, mid: str, file: Path, row: int) -> Path:
    direct = images_dir / mid
    if is_image_name(mid) and direct.exists():
        return direct
    for ext in sorted(IMAGE_EXTENSIONS):
        for cand in (images_dir / f"{mid}{ext}", images_dir / f"{mid}{ext.upper()}"):
            if cand.exists():
                return cand
    raise DataError(file, f"no image for post id {mid!r} in {images_dir}", row)


# ---------------------------------------------------------------- plain folders
@dataclass(frozen=True)
class FolderEntry:
    """One file under a folder: its id (the path relative to the root, ``/``-separated; bytes that
    are not UTF-8 kept as surrogate escapes, exactly as the OS gives them), its path, and, for a
    file that cannot be listed or followed, the reason it gets an error row instead of a prediction."""

    id: str
    path: Path
    error: str | None = None


def walk_folder(root: str | Path, exclude: Iterable[str | Path] = ()) -> Iterator[FolderEntry]:
    """Every file under ``root``, in a stable order (sorted names, a folder's files before its subfolders).

    Nothing is skipped without a word: files of any type are listed (whether they decode is for the
    image loader to say); a link to a folder, a folder that cannot be opened and a path that cannot be
    followed each yield an entry with ``error`` set. The walk is iterative (a tree thousands of levels
    deep is fine) and opens folders by file descriptor, so paths longer than PATH_MAX are listed too.
    Links to folders are not followed, so a link loop cannot make the walk endless. ``exclude``: paths
    never listed (the run's own output and its lock file when they live inside the input folder).
    """
    from dhumor.util.longpaths import open_fd

    root = Path(root)
    skip = {os.path.abspath(p) for p in exclude}
    stack: list[str] = [""]  # folders still to list, as paths relative to root
    while stack:
        rel = stack.pop()
        folder = root / rel if rel else root
        try:
            fd = open_fd(folder, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as e:
            yield FolderEntry(rel + "/" if rel else ".", folder, f"cannot open folder: {e.strerror or e}")
            continue
        files, subdirs = [], []
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = entry.name
                    try:
                        is_dir = entry.is_dir(follow_symlinks=False)
                        link_to_dir = not is_dir and entry.is_symlink() and entry.is_dir(follow_symlinks=True)
                    except OSError:  # cannot stat: listed, and the loader names the reason
                        is_dir = link_to_dir = False
                    (subdirs if is_dir else files).append((name, link_to_dir))
        except OSError as e:
            yield FolderEntry(rel + "/" if rel else ".", folder, f"cannot list folder: {e.strerror or e}")
            continue
        finally:
            os.close(fd)
        for name, link_to_dir in sorted(files):
            path = folder / name
            if skip and os.path.abspath(path) in skip:
                continue
            error = "a link to a folder: not followed (score the folder it points to instead)" if link_to_dir else None
            yield FolderEntry(f"{rel}/{name}" if rel else name, path, error)
        stack.extend(f"{rel}/{name}" if rel else name for name, _ in sorted(subdirs, reverse=True))


def read_image_folder(root: str | Path) -> ReadResult:
    """Every image under ``root`` (recursively), unlabelled; the id is the path relative to root.
    Files that are not images by name, or cannot be followed, are in ``skipped`` with the reason."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "not a directory")
    result = ReadResult([])
    for e in walk_folder(root):
        if e.error is None and is_image_name(e.id):
            result.memes.append(Meme(id=e.id, image=e.path, caption=None, labels={}, source=str(e.path)))
        else:
            result.skipped.append(DataError(e.path, e.error or "not an image file name"))
    return result


# ---------------------------------------------------------------- dispatch
def detect_format(path: str | Path) -> str:
    path = Path(path)
    if path.is_dir():
        return "folder"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "harmeme"
    if suffix in (".csv", ".xlsx", ".xlsm", ".xls", ".tsv"):
        return "dhumor"
    raise DataError(path, f"cannot tell the format of {path.name!r}; pass --format harmeme|dhumor|folder")


def read_manifest(path: str | Path, format: Format = "auto", images: str | Path | None = None,
                  skip_bad: bool = False) -> ReadResult:
    """Read a manifest (HarMeme jsonl, D-HUMOR table) or a folder of images."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "folder":
        return read_image_folder(path)
    if fmt == "harmeme":
        return read_harmeme_jsonl(path, images, skip_bad)
    if fmt == "dhumor":
        return read_dhumor_table(path, images, skip_bad)
    raise InvalidValueError(f"unknown format {format!r}")


def json_lines(data: bytes) -> list[tuple[int, str | None]]:
    """``(line number, text)`` of every line of a JSON-lines file: the one splitter of every reader and every
    id count. Lines end at "\\n" only (JSON allows a raw U+2028 or U+0085 inside a string, which
    ``str.splitlines`` would cut), a trailing "\\r" is dropped, a UTF-8 BOM is accepted; a line that is
    not UTF-8 is ``None`` (that row's error, not the file's). Blank lines are left out."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out: list[tuple[int, str | None]] = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        if not raw.strip():
            continue
        try:
            out.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError:
            out.append((n, None))
    return out


def read_json_lines(path: Path) -> list[tuple[int, str | None]]:
    """:func:`json_lines` of a file; DataError when it cannot be read or holds no rows."""
    if not path.exists():
        raise DataError(path, "file not found")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(path, f"cannot read: {e.strerror or e}") from None
    lines = json_lines(data)
    if not lines:
        raise DataError(path, "empty file: no rows")
    return lines


_read_lines = read_json_lines  # the name older code imports


def _default_images_dir(manifest: Path) -> Path:
    cand = manifest.parent / "images"
    return cand if cand.is_dir() else manifest.parent


def _norm(s: str) -> str:
    s = re.sub(r"[_\-]+", " ", str(s).strip().lower())
    s = re.sub(r"\s*/\s*", "/", s)
    return re.sub(r"\s+", " ", s)
