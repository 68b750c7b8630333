"""What identifies the model behind a verdict: a digest of the checkpoint's weights and calibration."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path


@functools.lru_cache(maxsize=8)
def checkpoint_digest(path: str) -> str:
    """sha256 of the checkpoint's weights file (``model.safetensors`` of an export folder, or the
    ``.ckpt``) and, for a folder, of its ``dhumor.json`` (temperatures and presets change decisions)."""
    p = Path(path)
    files = [p / "model.safetensors", p / "dhumor.json"] if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        if f.is_file():
            h.update(f.name.encode() + b"\0")
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
