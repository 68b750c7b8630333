"""Versioned prompt files. The version name and a digest of the files are part of every cache key,
so editing a prompt recomputes exactly the explanations it affects."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_VERSION = "v1"
_NAMES = ("system", "explain", "critique", "repair", "image_line_attached", "image_line_cues")


@dataclass(frozen=True)
class Prompts:
    version: str
    texts: dict

    @classmethod
    def load(cls, version: str = DEFAULT_VERSION, directory: str | Path | None = None) -> "Prompts":
        """Prompts of ``version`` (a folder under dhumor/explain/prompts, or ``directory`` itself)."""
        d = Path(directory) if directory else PROMPTS_DIR / version
        if not d.is_dir():
            raise FileNotFoundError(f"prompt version {version!r} not found at {d}")
        missing = [n for n in _NAMES if not (d / f"{n}.txt").exists()]
        if missing:
            raise FileNotFoundError(f"{d} lacks prompt files {[m + '.txt' for m in missing]}")
        return cls(version if not directory else d.name, {n: (d / f"{n}.txt").read_text().strip() for n in _NAMES})

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for n in _NAMES:
            h.update(n.encode() + b"\0" + self.texts[n].encode() + b"\0")
        return h.hexdigest()[:12]

    @property
    def id(self) -> str:
        return f"{self.version}-{self.digest}"

    def render(self, name: str, **values) -> str:
        # str.format would trip on braces in captions or JSON; replace named slots only.
        text = self.texts[name]
        for k, v in values.items():
            text = text.replace("{" + k + "}", str(v))
        return text
