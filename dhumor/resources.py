"""Files that ship inside the package, found the same way from a checkout and from ``pip install``.

The default checkpoint and the example memes live in ``dhumor/assets/`` (the repository's
``checkpoints/`` and ``examples/`` are links to them), so an installed package needs nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

from dhumor.errors import CheckpointError

ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED_CHECKPOINT = ASSETS / "checkpoints" / "harmeme-tcrnet"
EXAMPLES_DIR = ASSETS / "examples"
ENV_CHECKPOINT = "DHUMOR_CHECKPOINT"


def default_checkpoint() -> Path:
    """``$DHUMOR_CHECKPOINT``, else the checkpoint shipped in the package."""
    env = os.environ.get(ENV_CHECKPOINT)
    p = Path(env).expanduser() if env else SHIPPED_CHECKPOINT
    if not p.exists():
        where = f"${ENV_CHECKPOINT} points at {p}, which does not exist" if env else \
            f"{p} is missing from this installation (reinstall dhumor: pip install --force-reinstall dhumor)"
        raise CheckpointError(f"the default checkpoint: {where}; or pass --checkpoint DIR")
    return p


def examples_dir() -> Path:
    """The generated example memes shipped with the package."""
    return EXAMPLES_DIR
