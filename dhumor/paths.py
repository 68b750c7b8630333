"""Where data lives: one setting for every command, config, benchmark and test.

The data root is ``--data.root`` (Lightning commands) or ``--data`` (benchmarks), else the
``DHUMOR_DATA`` environment variable, else ``data/harmeme-c`` under the current directory (what
``dhumor data harmeme SRC data/harmeme-c`` writes; git-ignored). Relative manifest paths in configs
(``train: train.jsonl``) resolve against it, so no config names a folder of one machine.

>>> import os; os.environ["DHUMOR_DATA"] = "/data/harm-c"
>>> str(data_root())
'/data/harm-c'
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_DATA = "DHUMOR_DATA"
DEFAULT_DATA_ROOT = Path("data") / "harmeme-c"
GET_DATA_HINT = ("get Harm-C with `dhumor data harmeme SRC {root}` (SRC: a clone of "
                 "https://github.com/di-dimitrov/mmf), or point DHUMOR_DATA (or `dhumor fit`'s --data.root, "
                 "a bench's --data) at a folder that has it")


def get_data_hint(root: str | os.PathLike | None = None) -> str:
    """How to put data where the data root (``root``, else the one in use) says it is."""
    return GET_DATA_HINT.format(root=data_root(root))


def data_root(root: str | os.PathLike | None = None) -> Path:
    """``root`` if given, else ``$DHUMOR_DATA``, else ``data/harmeme-c``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get(ENV_DATA)
    return Path(env).expanduser() if env else DEFAULT_DATA_ROOT


def resolve_data_path(path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """A manifest or folder path: absolute as given; relative under the data root when it exists
    there, else relative to the current directory. Existence is the caller's check."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    under_root = data_root(root) / p
    if under_root.exists() or not p.exists():
        return under_root
    return p
