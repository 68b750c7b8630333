"""The structured explanation, and a parser that accepts what language models actually write.

Accepted forms, in order: a JSON object (anywhere in the text, also inside a ```json fence), or
labelled sections (``Summary: ...``, ``**Implied joke**: ...``). Keys are matched loosely
(``implied joke``, ``Implied_Joke``); list values are joined. Anything else is a ParseError that
says what is missing, which the loop turns into a repair prompt.
"""
from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

FIELDS = ("summary", "implied_joke", "narrative_structure", "emotional_effect", "dark_attributes", "target")
LABELS = {"summary": "Summary", "implied_joke": "Implied joke", "narrative_structure": "Narrative structure",
          "emotional_effect": "Emotional effect", "dark_attributes": "Dark attributes", "target": "Target"}


class ParseError(ValueError):
    """Model output that is not a usable explanation; the message says why."""


class Explanation(BaseModel):
    """What a meme means, field by field (the reasoning stream's input, rendered by :meth:`render`)."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    summary: str = Field(min_length=3)
    implied_joke: str = Field(min_length=3)
    narrative_structure: str = ""
    emotional_effect: str = ""
    dark_attributes: str = ""
    target: str = ""

    @field_validator(*FIELDS, mode="before")
    @classmethod
    def _flatten(cls, v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ", ".join(str(x).strip() for x in v if str(x).strip())
        if isinstance(v, dict):
            return "; ".join(f"{k}: {x}" for k, x in v.items())
        return str(v)

    def render(self) -> str:
        """Plain text for the reasoning encoder: one labelled line per non-empty field."""
        return "\n".join(f"{LABELS[f]}: {getattr(self, f)}" for f in FIELDS if getattr(self, f))


_SENTENCE_END = re.compile(r"[.!?。！？…][\"'”’)\]]*(?=\s|$)")


def trim_capped(text: str, max_chars: int | None) -> str:
    """A field the schema's length cap cut off mid-sentence, ended at its last full sentence instead
    (or marked with an ellipsis when no sentence ends in its second half). Only text that stopped
    right at the cap is touched: shorter text, and longer text from a backend that does not enforce
    the schema, stay as written; so does text already ended with an ellipsis (a field kept from the
    previous iteration)."""
    text = text.strip()
    if not max_chars or not (max_chars - 2 <= len(text) <= max_chars) or text.endswith("…"):
        return text
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= max_chars // 2:
        return text[: ends[-1]]
    return text.rstrip(" ,;:-") + "…"


def _norm_key(k: str) -> str:
    return re.sub(r"[^a-z]+", "_", k.strip().lower()).strip("_")


_KEY_ALIASES = {"joke": "implied_joke", "implied_meaning": "implied_joke", "implied_message": "implied_joke",
                "narrative": "narrative_structure", "structure": "narrative_structure",
                "emotion": "emotional_effect", "emotional_impact": "emotional_effect", "tone": "emotional_effect",
                "dark_elements": "dark_attributes", "dark_humor_attributes": "dark_attributes",
                "target_of_the_joke": "target", "butt_of_the_joke": "target", "description": "summary",
                "changes": "revised", "changed": "revised", "revision": "revised"}


def _canonical(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        nk = _norm_key(str(k))
        nk = _KEY_ALIASES.get(nk, nk)
        if nk in FIELDS or nk in ("critique", "revised"):
            out.setdefault(nk, v)
    return out


def json_objects(text: str) -> list[Any]:
    """Every top-level JSON object in ``text`` (fenced or bare), decoded, in order of appearance."""
    found = []
    for m in re.finditer(r"```(?:json)?\s*(\{.*?\})\s*```", text, re.S):
        try:
            found.append(json.loads(m.group(1), strict=False))
        except (json.JSONDecodeError, RecursionError):  # RecursionError: nested past Python's limit
            pass
    if found:
        return found
    dec = json.JSONDecoder(strict=False)  # raw newlines inside strings: small models (and llama.cpp's grammar) write them
    i = 0
    while True:
        i = text.find("{", i)
        if i < 0:
            break
        try:
            obj, end = dec.raw_decode(text, i)
            found.append(obj)
            i = end
        except json.JSONDecodeError:
            i += 1
        except RecursionError:  # nested past Python's limit: every later "{" is inside the same nest
            break
    return found


def _sections(text: str) -> dict:
    """``Label: value`` sections, for models that ignore the JSON instruction."""
    names = "|".join(sorted({re.escape(LABELS[f]) for f in FIELDS} | {f.replace("_", "[ _]") for f in FIELDS}, key=len,
                            reverse=True))
    pat = re.compile(rf"^[\s>*#\-\d.]*\**\s*({names})\s*\**\s*[:\-–]\s*(.*?)(?=^[\s>*#\-\d.]*\**\s*(?:{names})\s*\**\s*[:\-–]|\Z)",
                     re.I | re.M | re.S)
    return {_norm_key(m.group(1)): m.group(2).strip().strip("*").strip() for m in pat.finditer(text)}


def _validate(d: dict, what: str) -> Explanation:
    d = _canonical(d)
    missing = [f for f in FIELDS if f not in d]
    if len(missing) > 3:
        raise ParseError(f"{what} lacks the keys {missing}")
    try:
        return Explanation(**d)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ParseError(f"{what} is not a valid explanation ({problems})") from None


def parse_explanation(text: str) -> Explanation:
    """An :class:`Explanation` from model output, or :class:`ParseError`."""
    if not text or not text.strip():
        raise ParseError("the answer is empty")
    for obj in json_objects(text):
        if isinstance(obj, dict):
            c = _canonical(obj)
            if isinstance(c.get("revised"), dict):  # a critique-shaped answer still carries an explanation
                return _validate(c["revised"], "the 'revised' object")
            if sum(f in c for f in FIELDS) >= 3:
                return _validate(obj, "the JSON object")
    sec = _sections(text)
    if sec:
        return _validate(sec, "the labelled answer")
    raise ParseError("no JSON object with the explanation keys and no labelled sections were found")


def parse_critique(text: str, previous: dict | None = None) -> tuple[str, Explanation]:
    """``(critique text, revised explanation)`` from a Role-Reversal answer, or :class:`ParseError`.

    With ``previous`` (the explanation under critique), the answer may carry only the fields it
    changes (``{"critique": ..., "changes": {...}}``, prompt v2): they are laid over ``previous``,
    and no changes at all means the author keeps the explanation as it is."""
    if not text or not text.strip():
        raise ParseError("the answer is empty")
    for obj in json_objects(text):
        if not isinstance(obj, dict):
            continue
        c = _canonical(obj)
        if "revised" in c:
            revised = c["revised"]
            if isinstance(revised, str):
                revised = parse_explanation(revised)
            elif isinstance(revised, dict):
                if previous is not None:
                    revised = {**previous, **{k: v for k, v in _canonical(revised).items() if v not in (None, "")}}
                revised = _validate(revised, "the 'revised' object")
            else:
                raise ParseError("'revised' is neither an object nor text")
            return _critique_text(c.get("critique", "")), revised
        if previous is not None and "critique" in c:  # a critique that changes nothing
            return _critique_text(c["critique"]), _validate(dict(previous), "the previous explanation")
    # No "revised" key: accept "critique ... then a plain explanation" written any other way.
    m = re.split(r"^\W*revised(?: explanation)?\W*$|\brevised(?: explanation)?\s*:", text, maxsplit=1,
                 flags=re.I | re.M)
    if len(m) == 2:
        crit = re.sub(r"^\W*critique\W*", "", m[0], flags=re.I).strip()
        return crit, parse_explanation(m[1])
    raise ParseError("no 'revised' explanation found in the answer")


def _critique_text(crit) -> str:
    if isinstance(crit, dict):
        crit = "\n".join(f"{LABELS.get(_norm_key(k), k)}: {v}" for k, v in crit.items())
    return str(crit).strip()
