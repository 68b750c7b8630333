"""Writing a file whole or not at all: a temporary file beside it, fsynced, then renamed over it.

A reader (or a crash at any moment) sees the old file or the new one, never half of the new one,
and no temporary file is left behind when the write fails (a full disk, a read-only folder).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "out.jsonl"
>>> atomic_write(p, "a\\n"); p.read_text()
'a\\n'
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterable


def atomic_write(path: str | os.PathLike, data: str | bytes | Iterable[bytes], encoding: str = "utf-8",
                 mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` (text, bytes, or an iterable of byte chunks) atomically and durably.
    ``mode``: the file's permissions (default: readable by others, as the umask allows)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, str):
                fh.write(data.encode(encoding))
            elif isinstance(data, (bytes, bytearray, memoryview)):
                fh.write(data)
            else:
                for chunk in data:
                    fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, (0o666 & ~_umask()) if mode is None else mode)  # mkstemp makes 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (read in 1 MiB chunks), in hex."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable (where the file system lets a folder be fsynced)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
