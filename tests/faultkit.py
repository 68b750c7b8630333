"""Real faults for tests and bench/faults.py: odd file names, deep and over-long paths, tmpfs mounts.

Every helper makes the fault for real (a name with an invalid UTF-8 byte, a tree 1,200 folders
deep, a path past PATH_MAX, a full or read-only tmpfs, an immutable file). Helpers that need root
or a kernel feature return None / raise ``Unavailable`` with the reason, for callers to skip.
"""
from __future__ import annotations

import contextlib
import http.server
import os
import threading
import subprocess
from pathlib import Path

import numpy as np
from PIL import Image

PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096


class Unavailable(Exception):
    """This machine cannot make the fault (not root, no tmpfs, no chattr): the reason says which."""


def png_bytes(seed: int = 0, size: tuple[int, int] = (48, 36), fmt: str = "PNG") -> bytes:
    import io

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def write_bytes_at(path: str | bytes, data: bytes) -> None:
    """Write a file whose name may hold any bytes (``path`` as bytes or a surrogate-escaped str)."""
    with open(os.fsencode(path), "wb") as fh:
        fh.write(data)


def odd_names() -> dict[str, str]:
    """File name (as Python sees it: invalid bytes as surrogate escapes) → what is odd about it."""
    return {
        os.fsdecode(b"invalid\xff utf8.png"): "a byte that is not UTF-8",
        os.fsdecode(b"latin1 caf\xe9.png"): "Latin-1 text, not UTF-8",
        "new\nline.png": "a newline",
        "carriage\rreturn.png": "a carriage return",
        "crlf\r\n.png": "CR LF",
        "back\\nslash.png": "a backslash then n (must not become a newline)",
        "line\u2028separator.png": "U+2028, a line break to str.splitlines",
        "next\x85line.png": "U+0085, a line break to str.splitlines",
        'quote",comma.png': "a quote and a comma",
        "tab\there.png": "a tab",
    }


def make_deep_tree(root: Path, depth: int, name: str = "d", file_data: bytes | None = None) -> Path:
    """``root/d/d/.../d/deep.png`` ``depth`` folders deep, built by relative mkdir/open (any length)."""
    root.mkdir(parents=True, exist_ok=True)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        out = os.open("deep.png", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        with os.fdopen(out, "wb") as fh:
            fh.write(file_data if file_data is not None else png_bytes())
    finally:
        os.close(fd)
    return root.joinpath(*([name] * depth), "deep.png")


def make_long_path(root: Path, min_bytes: int = PATH_MAX + 500) -> Path:
    """A PNG whose absolute path is longer than PATH_MAX (folders of 200-character names)."""
    name = "L" * 200
    depth = (min_bytes - len(os.fsencode(str(root)))) // (len(name) + 1) + 1
    return make_deep_tree(root, depth, name)


def remove_tree(root: Path) -> None:
    """``rm -rf``: copes with trees thousands of levels deep and paths past PATH_MAX, where
    shutil.rmtree (recursive in Python < 3.12) would stop with a RecursionError."""
    subprocess.run(["rm", "-rf", "--", str(root)], check=False)


@contextlib.contextmanager
def tmpfs(where: Path, size: str = "64k"):
    """A real tmpfs of ``size`` mounted at ``where`` (root only); yields the mount point."""
    mount_tmpfs(where, size)
    try:
        yield where
    finally:
        unmount(where)


def mount_tmpfs(where: Path, size: str = "64k") -> Path:
    """Mount a real tmpfs of ``size`` at ``where`` (root only); :func:`unmount` removes it."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    return where


def unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount_read_only(where: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(where)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"cannot remount read-only: {r.stderr.strip()}")


def fill_up(where: Path) -> None:
    """Fill a (small) file system until the disk is full."""
    fd = os.open(where / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def set_immutable(path: Path, on: bool = True) -> None:
    r = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        raise Unavailable(f"chattr {'+' if on else '-'}i failed: {r.stderr.strip() or 'chattr missing'}")


class RefusingServer:
    """A real local OpenAI-compatible HTTP server that refuses every request (HTTP 403, never retried):
    every explanation fails at once. ``with RefusingServer() as base_url: ...``"""

    def __enter__(self) -> str:
        class Refuse(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                body = b'{"error": "forbidden: no key"}'
                self.send_response(403)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
