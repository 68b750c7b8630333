"""Generators of every kind of broken or unusual image file a meme folder can hold.

Each entry: file name → (writer(path), expected) where expected is ``("ok", (w, h))`` or
``("error", reason substring)``. Used by the image-loading tests and the scoring tests.
"""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def _rgb(w=40, h=30):
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def _truncated(fmt):
    def write(p):
        buf = io.BytesIO()
        _rgb(200, 150).save(buf, fmt)
        p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return write


def _bomb(p: Path):
    # A valid 1x1 PNG whose header claims 100000 x 100000 pixels (CRC fixed so the header parses).
    buf = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length+type of IHDR
    data[ihdr:ihdr + 8] = struct.pack(">II", 100_000, 100_000)
    crc = zlib.crc32(bytes(data[12:12 + 4 + 13])) & 0xFFFFFFFF
    data[12 + 4 + 13:12 + 4 + 13 + 4] = struct.pack(">I", crc)
    p.write_bytes(bytes(data))


def _exif_rotated(p: Path):
    img = _rgb(40, 30)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    img.save(p, "JPEG", exif=exif.tobytes())


def _animated(fmt):
    def write(p):
        frames = [Image.new("RGB", (32, 24), c) for c in ("red", "green", "blue")]
        frames[0].save(p, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return write


def _palette_transparent(p: Path):
    img = Image.new("P", (20, 10), 0)
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    img.info["transparency"] = 0
    img.save(p, "PNG", transparency=0)


def _symlink_loop(p: Path):
    other = p.with_name("loop_b.jpg")
    os.symlink(other.name, p)
    os.symlink(p.name, other)


CASES = {
    "zero_bytes.jpg": (lambda p: p.write_bytes(b""), ("error", "empty file")),
    "truncated.jpg": (_truncated("JPEG"), ("error", "truncated or corrupt")),
    "truncated.png": (_truncated("PNG"), ("error", "truncated or corrupt")),
    "html_page.jpg": (lambda p: p.write_text("<html><body>404 not found</body></html>"),
                      ("error", "not a recognised image format")),
    "bomb.png": (_bomb, ("error", "decompression bomb")),
    "cmyk.jpg": (lambda p: _rgb().convert("CMYK").save(p, "JPEG"), ("ok", (40, 30))),
    "sixteen_bit.png": (lambda p: Image.fromarray((np.arange(1200).reshape(30, 40) * 50).astype(np.uint16)).save(p),
                        ("ok", (40, 30))),
    "rgba.png": (lambda p: _rgb().convert("RGBA").save(p), ("ok", (40, 30))),
    "palette_transparent.png": (_palette_transparent, ("ok", (20, 10))),
    "grey.png": (lambda p: _rgb().convert("L").save(p), ("ok", (40, 30))),
    "one_bit.png": (lambda p: _rgb().convert("1").save(p), ("ok", (40, 30))),
    "animated.gif": (_animated("GIF"), ("ok", (32, 24))),
    "animated.webp": (_animated("WEBP"), ("ok", (32, 24))),
    "exif_rotated.jpg": (_exif_rotated, ("ok", (30, 40))),
    "ünïcode name with spaces 😀.png": (lambda p: _rgb().save(p), ("ok", (40, 30))),
    "loop_a.jpg": (_symlink_loop, ("error", "cannot read file")),
    "a_directory.jpg": (lambda p: p.mkdir(), ("error", "not a regular file")),
}


def write_all(folder: Path) -> dict[str, tuple]:
    """Write every case into ``folder``; returns name → expected."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (write, expected) in CASES.items():
        write(folder / name)
        out[name] = expected
    out["loop_b.jpg"] = ("error", "cannot read file")  # the loop's other half
    return out
