"""Build a Harm-C folder from a clone of the public ``di-dimitrov/mmf`` repository.

``dhumor data harmeme SRC OUT`` reads ``SRC/data/datasets/memes/defaults/annotations/{train,val,test}.jsonl``
and ``.../defaults/images/``, validates every row (labels known, image present, ids unique) with the
same reader that training uses, and writes ``OUT/{train,val,test}.jsonl`` plus ``OUT/images/`` (the
PNG files as they are: hard links where the filesystem allows, copies elsewhere). Manifests are
written last and atomically, so an interrupted conversion never leaves a manifest that names a
missing image; rerunning it finishes the job.

>>> counts = convert_harmeme("mmf", "data/harmeme-c")                   # doctest: +SKIP
>>> counts["train"]["memes"], counts["val"]["memes"], counts["test"]["memes"]   # doctest: +SKIP
(3013, 177, 354)
"""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

from dhumor.errors import DataError
from dhumor.util.files import atomic_write
from dhumor.schema import HARMEME
from dhumor.data.readers import read_harmeme_jsonl

SPLITS = ("train", "val", "test")
MMF_DEFAULTS = Path("data") / "datasets" / "memes" / "defaults"


def find_harmeme_source(src: str | Path) -> Path:
    """The ``defaults`` folder (``annotations/`` + ``images/``) inside an mmf clone, or ``src`` itself."""
    src = Path(src).expanduser()
    if not src.exists():
        raise DataError(src, "not found; clone it first: git clone --depth 1 https://github.com/di-dimitrov/mmf")
    for cand in (src / MMF_DEFAULTS, src / "defaults", src):
        if (cand / "annotations").is_dir():
            if not (cand / "images").is_dir():
                raise DataError(cand / "images", "missing: the clone has annotations but no images folder "
                                                 "(was it cloned with git-lfs or sparse checkout?)")
            return cand
    raise DataError(src, f"no {MMF_DEFAULTS.as_posix()}/annotations here: is this a clone of "
                         "https://github.com/di-dimitrov/mmf ?")


def _place(src: Path, dst: Path) -> None:
    """Hard-link (no extra disk) or copy ``src`` (links followed) to ``dst`` atomically; a ``dst`` that is
    already the same file or has the same bytes is kept, anything else there is replaced."""
    import filecmp

    src = src.resolve()
    if dst.exists() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never a half-copied file left behind
        raise


def convert_harmeme(src: str | Path, out: str | Path, splits: tuple[str, ...] = SPLITS) -> dict[str, dict]:
    """Validate and write Harm-C ``splits`` from an mmf clone into ``out``; returns counts per split.

    Raises :class:`~dhumor.errors.DataError` naming the file, the row and the reason (every missing
    image is counted, the first few named) before anything is written.
    """
    base = find_harmeme_source(src)
    ann, images = base / "annotations", base / "images"
    read, problems = {}, []
    for split in splits:
        f = ann / f"{split}.jsonl"
        if not f.exists():
            problems.append(f"{f}: missing (Harm-C needs {', '.join(s + '.jsonl' for s in splits)})")
            continue
        res = read_harmeme_jsonl(f, images, skip_bad=True)
        problems += [str(e) for e in res.skipped]
        for m in res.memes:
            if not m.image.resolve().is_file():
                problems.append(f"{m.source}: image {m.image} is not a regular file")
        read[split] = (f, res.memes)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise DataError(base, f"{len(problems)} problem(s); nothing was written:\n  {shown}{more}")
    seen: dict[str, str] = {}
    for split, (_, memes) in read.items():  # one meme in two splits would leak test labels into training
        for m in memes:
            if m.id in seen and seen[m.id] != split:
                raise DataError(ann, f"id {m.id!r} is in both {seen[m.id]} and {split}; nothing was written")
            seen[m.id] = split

    out = Path(out).expanduser()
    real_out, real_base = out.resolve(), base.resolve()
    if real_out == real_base or real_base in real_out.parents:
        raise DataError(out, f"is inside the source {base}; write the converted copy somewhere else")
    try:
        return _write(read, base, out)
    except OSError as e:
        raise DataError(out, f"cannot write the converted data: {e.strerror or e}"
                             f"{' (' + e.filename + ')' if getattr(e, 'filename', None) else ''}") from None


def _write(read: dict, base: Path, out: Path) -> dict[str, dict]:
    images = base / "images"
    harmfulness, target = HARMEME.task("harmfulness"), HARMEME.task("target")
    (out / "images").mkdir(parents=True, exist_ok=True)
    counts: dict[str, dict] = {}
    for split, (f, memes) in read.items():
        for m in memes:  # the manifest's relative image path is kept (subfolders too)
            _place(m.image, out / "images" / m.image.relative_to(images))
        from dhumor.data.readers import json_lines

        lines = [line for _, line in json_lines(f.read_bytes()) if line is not None]  # "\n" only ends a row
        atomic_write(out / f"{split}.jsonl", "".join(line + "\n" for line in lines))
        levels = Counter(harmfulness.classes[m.labels["harmfulness"]] for m in memes if m.labels["harmfulness"] >= 0)
        targets = Counter(target.classes[m.labels["target"]] for m in memes if m.labels["target"] >= 0)
        counts[split] = {"memes": len(memes), "harmfulness": dict(levels), "target": dict(targets)}
    (out / "SOURCE.json").write_text(json.dumps({"source": str(base), "format": "harmeme jsonl",
                                                 "counts": counts}, indent=2) + "\n")
    return counts
