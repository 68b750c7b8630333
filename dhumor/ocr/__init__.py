"""OCR engines behind one small interface.

Every module in ``dhumor/ocr/engines/`` registers one engine in :data:`ENGINES` (a new engine is a
new file there, plus its pip extra); installed packages add engines through the entry-points group
``dhumor.ocr_engines``. An engine is a factory that returns ``detect(rgb_array) -> [(box, text,
score), ...]``; :class:`~dhumor.ocr.reader.OCR` puts the stage cache and reading order around it.

>>> from dhumor.ocr import ENGINES, create_ocr
>>> "rapidocr" in ENGINES.names()
True
>>> ocr = create_ocr("rapidocr")                                  # doctest: +SKIP
>>> ocr.read_file("examples/chelsea.jpg")                          # doctest: +SKIP
"WHEN THE VET SAYS\\nIT'S JUST A SMALL\\nPROCEDURE"
"""
from __future__ import annotations

from dhumor.ocr.registry import ENGINES, NONE

__all__ = ["ENGINES", "NONE", "OCR", "OCRFailed", "check_engine", "create_ocr", "engine_choices", "reading_order"]


def engine_choices() -> list[str]:
    """What ``--ocr`` accepts: every registered engine, and ``none``."""
    return [*ENGINES.names(), NONE]


def create_ocr(engine: str | None, cache=None):
    """An :class:`~dhumor.ocr.reader.OCR` for ``engine``; None for ``None``/``"none"`` (no OCR)."""
    if engine in (None, NONE, ""):
        return None
    from dhumor.ocr.reader import OCR

    return OCR(engine, cache)


def check_engine(engine: str | None) -> None:
    """Preflight: the engine is known and installed (ConfigError naming the fix otherwise)."""
    if engine in (None, NONE, ""):
        return
    ENGINES.preflight(engine)


def __getattr__(name):  # the reader's names, loaded only when asked for (numpy, PIL, the cache)
    if name in ("OCR", "OCRFailed", "reading_order", "OCR_VERSION", "STAGE"):
        from dhumor.ocr import reader

        return getattr(reader, name)
    raise AttributeError(name)
