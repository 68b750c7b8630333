"""The first stage of every command that reads memes: decode the file (and its sha256), read its caption.

No torch here: Ray's decode workers and ``dhumor explain`` import this, not the model stack.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from PIL import Image

from dhumor.errors import DataError, DHumorError
from dhumor.images import load_image_with_digest
from dhumor.inference.items import Item
from dhumor.ocr import OCRFailed


@dataclass
class Prepared:
    """One meme between the stages: decoded image, caption, explanation, timings, or the error that stopped it."""

    item: Item
    image: Image.Image | None = None
    sha256: str | None = None
    caption: str | None = None
    caption_source: str | None = None
    explanation: str | None = None
    trail: dict | None = None
    explanation_error: str | None = None
    error: str | None = None
    error_kind: str | None = None  # "permanent" (the file itself; a rerun gives the same) or "transient"
    timings: dict = field(default_factory=dict)
    ood: dict | None = None  # {"score", "unfamiliar"} once forwarded (None: the checkpoint has no statistics)


PERMANENT, TRANSIENT = "permanent", "transient"
# What an explanation backend may raise for one batch: the server (requests' errors are OSErrors), the
# project's own errors, memory. Anything else is a bug in dhumor and must not become a row.
EXPLAINER_FAULTS = (OSError, MemoryError, DHumorError)


def _describe_exception(e: BaseException) -> str:
    return str(e) if isinstance(e, DHumorError) else f"{type(e).__name__}: {e}"


def is_permanent(row: dict) -> bool:
    """A row error that a rerun would give again (legacy rows called it "input")."""
    return bool(row.get("error")) and row.get("error_kind") in (PERMANENT, "input")


def explainer_provenance(settings: dict | None) -> dict | None:
    """The explainer part of a row's provenance: backend, model, prompt version, iterations."""
    if not settings:
        return None
    backend = settings.get("backend") or {}
    return {"backend": backend.get("backend"), "model": backend.get("model"),
            "prompt_version": settings.get("prompts"), "iterations": settings.get("iterations")}


def preprocess(item: Item, ocr=None, image: Image.Image | None = None, sha256: str | None = None) -> Prepared:
    """Decode the image (unless given) and read its caption (unless given, with ``ocr`` when there is one):
    the first stage of every command that reads memes (score, evaluate, explain, the demo). Every failure
    is the meme's ``error`` with its kind (permanent or transient), never an exception. Thread-safe."""
    p = Prepared(item)
    if item.error:
        p.error, p.error_kind = item.error, PERMANENT
        return p
    t = time.perf_counter()
    if image is None:
        try:
            image, sha256 = load_image_with_digest(item.path)
        except DataError as e:
            p.error, p.error_kind, p.timings["decode"] = e.reason, PERMANENT, time.perf_counter() - t
            return p
        except OSError as e:  # a file system surprise: this meme fails, the batch goes on
            p.error, p.error_kind = f"cannot read file: {_describe_exception(e)}", PERMANENT
            return p
        except MemoryError as e:
            p.error, p.error_kind = f"out of memory decoding the file: {e}", TRANSIENT
            return p
        p.timings["decode"] = time.perf_counter() - t
    p.image, p.sha256 = image, sha256
    if item.caption is not None:
        p.caption, p.caption_source = item.caption, "given"
    elif ocr is not None:
        t = time.perf_counter()
        try:
            p.caption, p.caption_source = ocr.read(image, sha256), ocr.engine
        except OCRFailed as e:  # the engine failed on this image: the batch goes on
            p.error, p.error_kind = f"OCR failed: {e}", e.kind
            return p
        except MemoryError as e:
            p.error, p.error_kind = f"OCR failed: out of memory: {e}", TRANSIENT
            return p
        p.timings["ocr"] = time.perf_counter() - t
    p.explanation = item.explanation
    return p
