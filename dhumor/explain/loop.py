"""The Role-Reversal Self-Loop (D-HUMOR): explain, then repeatedly critique as the meme's author and revise.

Iteration 1 asks for the structured explanation. Each iteration k >= 2 gives the model the meme and
the previous explanation and has it act as the meme's author: review the explanation against its
intended humor, message and tone, name what is inaccurate or missing field by field, and write a
corrected, complete explanation. The loop stops after ``iterations`` rounds, or earlier when a
revision no longer changes meaningfully (similarity to the previous one >= ``similarity_threshold``).

Every iteration is kept with its critique, raw outputs and repairs: the audit trail moderators see.
Unparseable output gets ``max_repairs`` repair prompts; then the iteration is recorded as failed
with its raw text. A failure in iteration 1 fails the meme; a later failure keeps the last good
explanation. Requests for many memes are batched per iteration.
"""
from __future__ import annotations

import collections
import dataclasses
import difflib
import json
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator, Sequence

from PIL import Image

from ..errors import InvalidValueError
from .backends.base import Backend, Generation, GenerationRequest
from .prompts import Prompts
from .schema import FIELDS, Explanation, ParseError, parse_critique, parse_explanation, trim_capped

def _string(max_chars: int | None) -> dict:
    return {"type": "string", "maxLength": max_chars} if max_chars else {"type": "string"}


def explanation_schema(field_chars: int | None = None) -> dict:
    """The explanation's JSON schema; ``field_chars`` caps each field's length (backends that enforce
    schemas close the string there instead of letting a rambling answer run to ``max_tokens`` and
    fail to parse)."""
    return {"type": "object", "properties": {f: _string(field_chars) for f in FIELDS}, "required": list(FIELDS)}


def critique_schema(field_chars: int | None = None) -> dict:
    """Prompts v1: a critique per field and the whole revised explanation."""
    return {"type": "object", "required": ["critique", "revised"],
            "properties": {"critique": {"type": "object", "properties": {f: _string(field_chars) for f in FIELDS},
                                        "required": list(FIELDS)},
                           "revised": explanation_schema(field_chars)}}


def changes_schema(field_chars: int | None = None) -> dict:
    """Prompts v2: a one-sentence critique and only the fields the author rewrites."""
    return {"type": "object", "required": ["critique", "changes"],
            "properties": {"critique": _string(field_chars),
                           "changes": {"type": "object", "properties": {f: _string(field_chars) for f in FIELDS}}}}


@dataclass
class LoopInput:
    image: Image.Image | None
    caption: str
    visual_cues: list[str] | None = None  # for backends that cannot see the image


@dataclass
class IterationRecord:
    iteration: int
    kind: str  # "explain" or "role_reversal"
    explanation: dict | None = None
    text: str | None = None
    critique: str | None = None
    similarity: float | None = None  # to the previous iteration's explanation
    raw: list[str] = field(default_factory=list)  # the first answer, then each repair's answer
    repaired: bool = False
    error: str | None = None
    backend_error: bool = False  # the backend failed (server down, timeout): not cached, a rerun retries
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


@dataclass
class LoopResult:
    status: str  # "ok" or "failed"
    iterations: list[IterationRecord]
    final: dict | None = None
    text: str | None = None  # the final explanation rendered for the reasoning encoder
    stop_reason: str = ""
    error: str | None = None
    visual_cues: list[str] | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def backend_failed(self) -> bool:
        """Some iteration failed for the backend's sake (not the model's): worth retrying later."""
        return any(it.backend_error or (it.error or "").startswith("backend error") for it in self.iterations)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoopResult":
        its = [IterationRecord(**it) for it in d.get("iterations", [])]
        return cls(**{**d, "iterations": its})


def similarity(a: str, b: str) -> float:
    """How alike two explanations read (0..1), on their rendered text."""
    return difflib.SequenceMatcher(None, " ".join(a.lower().split()), " ".join(b.lower().split())).ratio()


class RoleReversalLoop:
    def __init__(self, backend: Backend, prompts: Prompts | None = None, iterations: int = 3,
                 similarity_threshold: float = 0.9, max_repairs: int = 1, max_tokens: int = 400,
                 temperature: float = 0.2):
        if iterations < 1:
            raise InvalidValueError("iterations must be at least 1")
        self.backend, self.prompts = backend, prompts or Prompts.load()
        self.iterations, self.threshold = iterations, similarity_threshold
        self.max_repairs, self.max_tokens, self.temperature = max_repairs, max_tokens, temperature
        self.field_chars = chars = self.prompts.settings.get("field_chars")
        # Capped fields bound the answer, but six of them at the cap can need more than max_tokens
        # (about 3 characters a token when the model rambles): cut off there, the JSON never closes and
        # the answer fails. The token cap grows to what the capped fields need.
        self.fields_tokens = len(FIELDS) * chars // 3 + 64 if chars else 0
        # v1: a critique per field plus a full revised explanation; v2: only what changes
        self.explain_tokens = max(max_tokens, self.fields_tokens)
        self.critique_tokens = max(round(self.prompts.settings["critique_tokens"] * max_tokens), self.fields_tokens)
        self.explanation_schema = explanation_schema(chars)
        self.critique_schema = (changes_schema if self.prompts.settings["critique"] == "changes" else critique_schema)(chars)

    def settings(self) -> dict:
        return {"prompts": self.prompts.id, "iterations": self.iterations, "threshold": self.threshold,
                "max_repairs": self.max_repairs, "max_tokens": self.max_tokens, "temperature": self.temperature,
                **({"fields_tokens": self.fields_tokens} if self.fields_tokens else {}),
                "backend": self.backend.fingerprint()}

    # ------------------------------------------------------------ prompts
    def _image_line(self, x: LoopInput) -> str:
        if self.backend.supports_images:
            return self.prompts.render("image_line_attached")
        return self.prompts.render("image_line_cues", cues=", ".join(x.visual_cues or []) or "nothing recognisable")

    def _request(self, x: LoopInput, user: str, schema: dict, max_tokens: int) -> GenerationRequest:
        return GenerationRequest(system=self.prompts.render("system"), user=user,
                                 image=x.image if self.backend.supports_images else None, json_schema=schema,
                                 max_tokens=max_tokens, temperature=self.temperature)

    def _first(self, x: LoopInput) -> GenerationRequest:
        user = self.prompts.render("explain", image_line=self._image_line(x), caption=_one_line(x.caption))
        return self._request(x, user, self.explanation_schema, self.explain_tokens)

    def _critique(self, x: LoopInput, previous: dict) -> GenerationRequest:
        user = self.prompts.render("critique", image_line=self._image_line(x), caption=_one_line(x.caption),
                                   previous=json.dumps(previous, ensure_ascii=False, indent=1))
        return self._request(x, user, self.critique_schema, self.critique_tokens)

    def _repair(self, req: GenerationRequest, raw: str, error: str, kind: str) -> GenerationRequest:
        keys = ", ".join(FIELDS) if kind == "explain" else (
            "critique, changes" if self.prompts.settings["critique"] == "changes" else "critique, revised")
        user = req.user + "\n\n" + self.prompts.render("repair", error=error, raw=raw[:1500], keys=keys)
        return dataclasses.replace(req, user=user)

    # ------------------------------------------------------------ running
    def _finish_attempt(self, job: "_Job", g: Generation) -> bool:
        """Record one answer of ``job``; True when its iteration is over (parsed, or out of repairs)."""
        r = job.rec
        r.prompt_tokens += g.prompt_tokens
        r.completion_tokens += g.completion_tokens
        r.seconds += g.seconds
        if g.error:  # the server failed: a repair prompt would not help, and a rerun should retry
            r.error = g.error if g.error.startswith("explanation server down") else f"backend error: {g.error}"
            r.backend_error = True
            return True
        r.raw.append(g.text)
        try:
            if job.kind == "explain":
                exp, crit = parse_explanation(g.text), None
            else:
                crit, exp = parse_critique(g.text, job.previous)
            if self.field_chars:  # a field the cap cut mid-sentence ends at its last full sentence
                exp = exp.model_copy(update={f: trim_capped(getattr(exp, f), self.field_chars) for f in FIELDS})
            r.explanation, r.text, r.critique = exp.model_dump(), exp.render(), crit
            r.error, r.repaired = None, job.attempt > 0
            return True
        except ParseError as e:
            r.error = f"unparseable answer: {e}"
            if job.attempt >= self.max_repairs:
                return True
            job.attempt += 1
            job.current = self._repair(job.request, g.text, str(e), job.kind)
            return False

    def _end_iteration(self, job: "_Job") -> bool:
        """Fold a finished iteration into the meme's result; True when the meme is done."""
        res, rec, it = job.result, job.rec, job.rec.iteration
        res.iterations.append(rec)
        if it == 1:
            if rec.explanation is None:
                res.status, res.error, res.stop_reason = "failed", rec.error, "failed"
                return True
            res.final, res.text = rec.explanation, rec.text
        else:
            if rec.explanation is None:
                res.stop_reason = f"iteration {it} failed; kept iteration {it - 1}"
                return True
            rec.similarity = round(similarity(res.text, rec.text), 4)
            res.final, res.text = rec.explanation, rec.text
            if rec.similarity >= self.threshold:
                res.stop_reason = f"converged at iteration {it} (similarity {rec.similarity:.2f})"
                return True
        if it >= self.iterations:
            res.stop_reason = f"completed {self.iterations} iteration{'s' if self.iterations > 1 else ''}"
            return True
        job.start(it + 1, "role_reversal", self._critique(job.x, res.final), res.final)
        return False

    def run_iter(self, inputs: Iterable[LoopInput], slots: int = 8) -> Iterator[tuple[int, LoopResult, bool]]:
        """Run the loop for many memes, yielding ``(index, result so far, done)`` after every finished
        iteration of any meme (the result object grows in place).

        Up to ``slots`` memes are in flight, each at whatever iteration it has reached: the backend
        is handed every ready request (a first explanation, a critique, a repair) through
        :meth:`Backend.stream`, and a finished meme's place goes to the next input at once, so the
        backend's batch stays full."""
        source = enumerate(inputs)
        ready: collections.deque[_Job] = collections.deque()
        in_flight = 0
        exhausted = False

        def pull(n: int) -> list[tuple[_Job, GenerationRequest]]:
            nonlocal in_flight, exhausted
            while not exhausted and len(ready) < n and in_flight < max(1, slots):
                nxt = next(source, None)
                if nxt is None:
                    exhausted = True
                    break
                job = _Job(nxt[0], nxt[1], LoopResult("ok", [], visual_cues=nxt[1].visual_cues))
                job.start(1, "explain", self._first(nxt[1]), None)
                ready.append(job)
                in_flight += 1
            take = [ready.popleft() for _ in range(min(n, len(ready)))]
            return [(j, j.current) for j in take]

        for job, g in self.backend.stream(pull):
            if not self._finish_attempt(job, g):
                ready.append(job)  # a repair
                continue
            done = self._end_iteration(job)
            if done:
                in_flight -= 1
            else:
                ready.append(job)
            yield job.index, job.result, done

    def run_many(self, inputs: Sequence[LoopInput], slots: int | None = None) -> list[LoopResult]:
        """Run the loop for many memes (all in one batch unless ``slots`` says fewer); results in input order."""
        out: list[LoopResult | None] = [None] * len(inputs)
        for i, res, done in self.run_iter(inputs, slots=slots or max(1, len(inputs))):
            if done:
                out[i] = res
        return out  # type: ignore[return-value]


@dataclass
class _Job:
    """One meme's place in the loop: its current iteration's record and the request to send next."""

    index: int
    x: LoopInput
    result: LoopResult
    kind: str = "explain"
    rec: IterationRecord = None  # type: ignore[assignment]
    request: GenerationRequest = None  # type: ignore[assignment]  # the iteration's prompt (repairs extend it)
    current: GenerationRequest = None  # type: ignore[assignment]  # what goes to the backend next
    previous: dict | None = None  # the explanation being critiqued
    attempt: int = 0

    def start(self, iteration: int, kind: str, request: GenerationRequest, previous: dict | None) -> None:
        self.kind, self.request, self.current, self.previous, self.attempt = kind, request, request, previous, 0
        self.rec = IterationRecord(iteration, kind)


def _one_line(s: str) -> str:
    return " / ".join(line.strip() for line in (s or "").splitlines() if line.strip())
