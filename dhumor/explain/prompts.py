"""Versioned prompt files. The version name and a digest of the files are part of every cache key,
so editing a prompt recomputes exactly the explanations it affects."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from dhumor.errors import InvalidValueError, MissingConfigFileError

PROMPTS_DIR = Path(__file__).parent / "prompts"
DEFAULT_VERSION = "v2"  # v2: the critique returns only what it changes (bench/explain_throughput.py)
# settings.json (optional) in a version's folder: how its critique answers are shaped and sized.
#   critique: "full" (v1: a critique per field + the whole revised explanation) or "changes"
#             (v2: a one-sentence critique + only the fields it rewrites);
#   critique_tokens: the critique answer's token cap, as a multiple of the explanation's;
#   field_chars: the most characters one field (and the critique) may have, enforced through the JSON
#             schema by backends that constrain output (llama.cpp's grammar, vLLM/llama-server's
#             response_format); null: no cap.
DEFAULT_SETTINGS = {"critique": "full", "critique_tokens": 2.0, "field_chars": None}
_NAMES = ("system", "explain", "critique", "repair", "image_line_attached", "image_line_cues")


@dataclass(frozen=True)
class Prompts:
    version: str
    texts: dict
    settings: dict = field(default_factory=lambda: dict(DEFAULT_SETTINGS))

    @classmethod
    def load(cls, version: str = DEFAULT_VERSION, directory: str | Path | None = None) -> "Prompts":
        """Prompts of ``version`` (a folder under dhumor/explain/prompts, or ``directory`` itself)."""
        d = Path(directory) if directory else PROMPTS_DIR / version
        if not d.is_dir():
            raise MissingConfigFileError(f"prompt version {version!r} not found at {d}")
        missing = [n for n in _NAMES if not (d / f"{n}.txt").exists()]
        if missing:
            raise MissingConfigFileError(f"{d} lacks prompt files {[m + '.txt' for m in missing]}")
        settings = dict(DEFAULT_SETTINGS)
        if (d / "settings.json").exists():
            settings.update(json.loads((d / "settings.json").read_text()))
        if settings["critique"] not in ("full", "changes"):
            raise InvalidValueError(f"{d / 'settings.json'}: critique must be 'full' or 'changes', not {settings['critique']!r}")
        chars = settings["field_chars"]
        # Above ~1000 llama.cpp refuses (or crashes on) the grammar that spells the cap out character by character.
        if chars is not None and (not isinstance(chars, int) or isinstance(chars, bool) or not 20 <= chars <= 1000):
            raise InvalidValueError(f"{d / 'settings.json'}: field_chars must be null or a whole number from 20 to 1000, "
                             f"not {chars!r}")
        return cls(version if not directory else d.name, {n: (d / f"{n}.txt").read_text().strip() for n in _NAMES},
                   settings)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for n in _NAMES:
            h.update(n.encode() + b"\0" + self.texts[n].encode() + b"\0")
        if self.settings != DEFAULT_SETTINGS:
            h.update(json.dumps(self.settings, sort_keys=True).encode())
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
