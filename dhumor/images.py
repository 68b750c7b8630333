"""Safe image decoding: every way a file in a meme folder can be broken becomes a clear ImageError.

Memes come from the wild: zero-byte files, truncated downloads, HTML saved as .jpg, CMYK and
16-bit scans, palette GIFs with transparency, animated WebPs, phone photos with EXIF rotation and
the occasional decompression bomb. :func:`load_image` returns an 8-bit RGB image or raises
:class:`~dhumor.errors.ImageError` naming the file and the reason.
"""
from __future__ import annotations

import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"}
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000: far above any meme, far below a bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, or an ImageError saying why they cannot be read."""
    path = Path(path)
    try:
        st = os.stat(path)  # follows links: a symlink loop raises ELOOP here
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    if not path.is_file():
        raise ImageError(path, "not a regular file")
    if st.st_size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    if st.st_size > max_bytes:
        raise ImageError(path, f"file is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit")
    try:
        return path.read_bytes()
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None


def decode_image(data: bytes, name: str | Path = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image (first frame of an animation)."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, "not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(name, f"refused: {e}") from None
    except Exception as e:  # PIL raises many types on garbage headers
        raise ImageError(name, f"cannot decode image header: {e}") from None
    w, h = img.size
    # Checked before any pixel is decoded: the header alone tells the size.
    if w * h > max_pixels:
        raise ImageError(name, f"image is {w}x{h} pixels, over the {max_pixels:,}-pixel limit (decompression bomb guard)")
    if w == 0 or h == 0:
        raise ImageError(name, f"image has no pixels ({w}x{h})")
    try:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img) or img
        return to_rgb(img)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError(name, f"truncated or corrupt image data: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB, compositing transparency on white and rescaling 16-bit / float data."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(scaled.round().astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV


def load_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int = DEFAULT_MAX_BYTES) -> Image.Image:
    """Read and decode an image file into upright 8-bit RGB, or raise ImageError naming the file."""
    return decode_image(read_image_bytes(path, max_bytes), path, max_pixels)


def load_image_with_digest(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
                           max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Image.Image, str]:
    """The decoded image and the sha256 of the file's bytes (one read serves both)."""
    data = read_image_bytes(path, max_bytes)
    return decode_image(data, path, max_pixels), sha256_bytes(data)


def decode_many(items, workers: int = 2, transform=None) -> list:
    """Decode ``(bytes, name)`` pairs on ``workers`` threads; each result is ``transform(image)`` (or
    the image), or the :class:`ImageError` that says why that file cannot be used."""
    from concurrent.futures import ThreadPoolExecutor

    def one(item):
        data, name = item
        try:
            img = decode_image(data, name)
            return transform(img) if transform else img
        except ImageError as e:
            return e

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, items))
