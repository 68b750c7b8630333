"""The unit of batch work: one meme to process, as listed by a folder walk or a manifest row.

Kept apart from scoring so that ``dhumor explain`` (and anything else that walks inputs) does not
import the scoring pipeline and its models.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class Item:
    id: str
    path: Path
    caption: str | None = None  # from a manifest, when it has one
    error: str | None = None  # a manifest row that names no usable image
