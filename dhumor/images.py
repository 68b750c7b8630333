"""Safe image decoding: every way a file in a meme folder can be broken becomes a clear ImageError.

Memes come from the wild: zero-byte files, truncated downloads, HTML saved as .jpg, CMYK and
16-bit scans, palette GIFs with transparency, animated WebPs, phone photos with EXIF rotation and
the occasional decompression bomb. :func:`load_image` returns an 8-bit RGB image or raises
:class:`~dhumor.errors.ImageError` naming the file and the reason.
"""
from __future__ import annotations

import errno
import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dhumor.errors import ImageError
from dhumor.util.longpaths import open_fd

try:  # HEIC/HEIF (phone photos) decode when the optional pillow-heif package is installed
    from pillow_heif import register_heif_opener

    register_heif_opener()
except ImportError:
    pass

Image.init()
_PIL_EXTENSIONS = set(Image.registered_extensions())
# Raster formats a meme folder holds; the optional ones count only when this Pillow decodes them.
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".ico"} | (
    {".avif", ".heic", ".heif"} & _PIL_EXTENSIONS)
# Why a file of a known, unreadable type gets no prediction (used in its error row).
_UNSUPPORTED = {
    ".svg": "SVG is a vector format; dhumor reads raster images (convert it to PNG)",
    ".svgz": "SVG is a vector format; dhumor reads raster images (convert it to PNG)",
    ".avif": "AVIF needs a Pillow built with AVIF support (Pillow >= 11.3 wheels); convert it to PNG or JPEG",
    ".heic": "HEIC needs the optional pillow-heif package (pip install pillow-heif); or convert it to JPEG",
    ".heif": "HEIF needs the optional pillow-heif package (pip install pillow-heif); or convert it to JPEG",
    ".pdf": "PDF is a document, not an image (export the page as PNG)",
}
DEFAULT_MAX_PIXELS = 50_000_000  # ~7000x7000: far above any meme, far below a bomb
DEFAULT_MAX_BYTES = 50 * 1024 * 1024


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _unrecognised(name: str | Path) -> str:
    """The reason an undecodable file gets no prediction, from what its name says it is."""
    suffix = Path(str(name)).suffix.lower()
    if suffix in IMAGE_EXTENSIONS:
        return "not a recognised image format"
    if suffix in _UNSUPPORTED:
        return f"unsupported file type {suffix}: {_UNSUPPORTED[suffix]}"
    kind = f"a {suffix} file" if suffix else "a file without an extension"
    return f"not an image ({kind}); supported: {' '.join(sorted(IMAGE_EXTENSIONS))}"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_image_bytes(path: str | Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The file's bytes, or an ImageError saying why they cannot be read.

    Works at any path length (past PATH_MAX through relative opens) and checks the opened file,
    not the name, so a file swapped or deleted meanwhile cannot slip through."""
    path = Path(path)
    try:
        # Follows links (a link loop raises ELOOP); O_NONBLOCK so that a FIFO cannot hang the batch.
        fd = open_fd(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ImageError(path, "broken link: its target does not exist" if os.path.islink(path)
                         else "file not found") from None
    except OSError as e:
        if e.errno == errno.ENXIO:  # a socket, or a device without a driver
            raise ImageError(path, "not a regular file") from None
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ImageError(path, "not a regular file")
        if st.st_size == 0:
            raise ImageError(path, "empty file (0 bytes)")
        if st.st_size > max_bytes:
            raise ImageError(path, f"file is {st.st_size:,} bytes, over the {max_bytes:,}-byte limit")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as e:
        raise ImageError(path, f"cannot read file: {e.strerror or e}") from None
    finally:
        os.close(fd)
    if not data:
        raise ImageError(path, "empty file (0 bytes)")
    if len(data) > max_bytes:  # it grew after the size check
        raise ImageError(path, f"file is over the {max_bytes:,}-byte limit")
    return data


def decode_image(data: bytes, name: str | Path = "<bytes>", max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode image bytes into an upright 8-bit RGB image (first frame of an animation)."""
    if not data:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError(name, _unrecognised(name)) from None
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
