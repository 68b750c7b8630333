"""Reading a meme's caption: any registered OCR engine, its detections in reading order, cached by
image content.

>>> from dhumor.ocr import create_ocr
>>> ocr = create_ocr("rapidocr")                                  # doctest: +SKIP
>>> ocr.read_file("examples/chelsea.jpg")                          # doctest: +SKIP
"WHEN THE VET SAYS\\nIT'S JUST A SMALL\\nPROCEDURE"
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from dhumor.cache import StageCache
from dhumor.errors import DHumorError
from dhumor.images import load_image_with_digest
from dhumor.ocr.registry import ENGINES

OCR_VERSION = 1
STAGE = "ocr"


class OCRFailed(DHumorError):
    """The OCR engine failed on one image. ``kind``: "permanent" (the same image fails again: one the
    engine cannot resize, a shape it cannot take) or "transient" (out of memory: worth a rerun)."""

    def __init__(self, engine: str, error: BaseException):
        self.kind = "transient" if _is_memory(error) else "permanent"
        super().__init__(f"{engine}: {type(error).__name__}: {str(error).strip()[:300]}")


def _is_memory(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, MemoryError) or "out of memory" in text or "failed to allocate" in text


def reading_order(detections: Sequence[tuple[np.ndarray, str, float]]) -> str:
    """Join (box, text, score) detections into lines, top to bottom and left to right.

    Boxes whose vertical centres lie within half a text height of each other form one line.
    """
    items = []
    for box, text, _ in detections:
        b = np.asarray(box, dtype=float).reshape(-1, 2)
        y0, y1 = b[:, 1].min(), b[:, 1].max()
        items.append(((y0 + y1) / 2, max(1.0, y1 - y0), b[:, 0].min(), text.strip()))
    items = [it for it in items if it[3]]
    items.sort(key=lambda it: (it[0], it[2]))
    lines: list[list[tuple]] = []
    for it in items:
        if lines and abs(it[0] - np.mean([x[0] for x in lines[-1]])) < 0.5 * min(it[1], lines[-1][0][1]):
            lines[-1].append(it)
        else:
            lines.append([it])
    return "\n".join(" ".join(x[3] for x in sorted(line, key=lambda x: x[2])) for line in lines)


class OCR:
    """One OCR engine with the stage cache in front of it (thread-safe, the engine loads on first use)."""

    def __init__(self, engine: str = "rapidocr", cache: StageCache | None = None, min_score: float | None = None):
        entry = ENGINES.get(engine)  # ConfigError naming the choices for an unknown engine
        self.engine, self.cache = engine, cache
        # Detections below the engine's own confidence floor are dropped (see each engine's module).
        self.min_score = entry.meta.get("min_score", 0.0) if min_score is None else min_score
        self._impl = None
        self._lock = threading.Lock()

    @property
    def settings(self) -> dict:
        return {"v": OCR_VERSION, "engine": self.engine, "min_score": self.min_score}

    def _load(self):
        with self._lock:
            if self._impl is None:
                self._impl = ENGINES.create(self.engine)
        return self._impl

    def _run(self, img: Image.Image) -> str:
        detect = self._load()
        try:  # whatever the engine raises on this image is this image's failure, not a bug of ours
            dets = detect(np.asarray(img.convert("RGB")))
        except Exception as e:
            raise OCRFailed(self.engine, e) from e
        return reading_order([d for d in dets if float(d[2]) >= self.min_score])

    def read(self, img: Image.Image, digest: str | None = None) -> str:
        """The text in ``img``; with the file's sha256 as ``digest`` the result is cached."""
        key = StageCache.key(digest, self.settings) if digest and self.cache else None
        if key:
            hit = self.cache.get(STAGE, key)
            if hit is not None:
                return hit.decode()
        text = self._run(img)
        if key:
            self.cache.put(STAGE, key, text.encode())
        return text

    def read_file(self, path: str | Path) -> str:
        img, digest = load_image_with_digest(path)
        return self.read(img, digest)
