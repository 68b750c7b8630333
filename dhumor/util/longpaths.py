"""Opening files and folders whatever their path's length: past PATH_MAX, through relative opens.

The kernel refuses a path string longer than PATH_MAX (4096 bytes on Linux) with ENAMETOOLONG,
but a file that deep still exists and can be reached by opening its folders one chunk at a time,
each relative to the last (``openat``). :func:`open_fd` does that only when the plain open fails.

>>> import os, tempfile
>>> fd = open_fd(tempfile.gettempdir(), os.O_RDONLY | os.O_DIRECTORY); os.close(fd)
"""
from __future__ import annotations

import errno
import os
from pathlib import Path

# Each relative open stays well under PATH_MAX, so no single call is refused.
_CHUNK_BYTES = 2048


def _chunks(parts: list[str]) -> list[str]:
    """Join path components into relative paths of at most ``_CHUNK_BYTES`` bytes each."""
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for part in parts:
        n = len(os.fsencode(part)) + 1
        if cur and size + n > _CHUNK_BYTES:
            out.append("/".join(cur))
            cur, size = [], 0
        cur.append(part)
        size += n
    if cur:
        out.append("/".join(cur))
    return out


def open_fd(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
    """``os.open(path, flags)``, falling back to a chain of relative opens for paths over PATH_MAX."""
    try:
        return os.open(path, flags | os.O_CLOEXEC, mode)
    except OSError as e:
        if e.errno != errno.ENAMETOOLONG:
            raise
    p = Path(os.path.abspath(path))
    *dirs, leaf = p.parts[1:]  # parts[0] is "/"
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for chunk in _chunks(dirs):
            nxt = os.open(chunk, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(leaf, flags | os.O_CLOEXEC, mode, dir_fd=fd)
    finally:
        os.close(fd)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of a file at any path length."""
    fd = open_fd(path, os.O_RDONLY)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()
