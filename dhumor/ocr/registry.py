"""The registry of OCR engines (light: no engine is imported until it is created)."""
from __future__ import annotations

from dhumor.registry import Registry

ENGINES = Registry("OCR engine", scan="dhumor.ocr.engines", group="dhumor.ocr_engines", flag="--ocr",
                   fallback="pass --ocr none to score without OCR")
NONE = "none"  # no OCR: captions come from the manifest (or there are none)
