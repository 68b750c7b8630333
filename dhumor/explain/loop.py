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

import difflib
import json
from dataclasses import asdict, dataclass, field
from typing import Sequence

from PIL import Image

from .backends.base import Backend, GenerationRequest
from .prompts import Prompts
from .schema import FIELDS, Explanation, ParseError, parse_critique, parse_explanation

_STR = {"type": "string"}
EXPLANATION_SCHEMA = {"type": "object", "properties": {f: _STR for f in FIELDS}, "required": list(FIELDS)}
CRITIQUE_SCHEMA = {"type": "object", "required": ["critique", "revised"],
                   "properties": {"critique": {"type": "object", "properties": {f: _STR for f in FIELDS},
                                               "required": list(FIELDS)},
                                  "revised": EXPLANATION_SCHEMA}}


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
            raise ValueError("iterations must be at least 1")
        self.backend, self.prompts = backend, prompts or Prompts.load()
        self.iterations, self.threshold = iterations, similarity_threshold
        self.max_repairs, self.max_tokens, self.temperature = max_repairs, max_tokens, temperature

    def settings(self) -> dict:
        return {"prompts": self.prompts.id, "iterations": self.iterations, "threshold": self.threshold,
                "max_repairs": self.max_repairs, "max_tokens": self.max_tokens, "temperature": self.temperature,
                "backend": self.backend.fingerprint()}

    # ------------------------------------------------------------ prompts
    def _image_line(self, x: LoopInput) -> str:
        if self.backend.supports_images:
            return self.prompts.render("image_line_attached")
        return self.prompts.render("image_line_cues", cues=", ".join(x.visual_cues or []) or "nothing recognisable")

    def _request(self, x: LoopInput, user: str, schema: dict) -> GenerationRequest:
        return GenerationRequest(system=self.prompts.render("system"), user=user,
                                 image=x.image if self.backend.supports_images else None, json_schema=schema,
                                 max_tokens=self.max_tokens, temperature=self.temperature)

    def _first(self, x: LoopInput) -> GenerationRequest:
        user = self.prompts.render("explain", image_line=self._image_line(x), caption=_one_line(x.caption))
        return self._request(x, user, EXPLANATION_SCHEMA)

    def _critique(self, x: LoopInput, previous: dict) -> GenerationRequest:
        user = self.prompts.render("critique", image_line=self._image_line(x), caption=_one_line(x.caption),
                                   previous=json.dumps(previous, ensure_ascii=False, indent=1))
        req = self._request(x, user, CRITIQUE_SCHEMA)
        req.max_tokens = 2 * self.max_tokens  # a critique plus a full revised explanation
        return req

    def _repair(self, req: GenerationRequest, raw: str, error: str, kind: str) -> GenerationRequest:
        keys = ", ".join(FIELDS) if kind == "explain" else "critique, revised"
        user = req.user + "\n\n" + self.prompts.render("repair", error=error, raw=raw[:1500], keys=keys)
        return GenerationRequest(req.system, user, req.image, req.json_schema, req.max_tokens, req.temperature)

    # ------------------------------------------------------------ running
    def _generate_parsed(self, reqs: list[GenerationRequest], kind: str) -> list[IterationRecord]:
        """Generate, parse, and repair what does not parse; one record per request."""
        recs = [IterationRecord(0, kind) for _ in reqs]
        pending = list(range(len(reqs)))
        current = list(reqs)
        for attempt in range(self.max_repairs + 1):
            gens = self.backend.generate([current[i] for i in pending])
            retry = []
            for i, g in zip(pending, gens):
                r = recs[i]
                r.prompt_tokens += g.prompt_tokens
                r.completion_tokens += g.completion_tokens
                r.seconds += g.seconds
                if g.error:
                    r.error = f"backend error: {g.error}"
                    continue  # the server failed: a repair prompt would not help
                r.raw.append(g.text)
                try:
                    if kind == "explain":
                        exp, crit = parse_explanation(g.text), None
                    else:
                        crit, exp = parse_critique(g.text)
                    r.explanation, r.text, r.critique = exp.model_dump(), exp.render(), crit
                    r.error, r.repaired = None, attempt > 0
                except ParseError as e:
                    r.error = f"unparseable answer: {e}"
                    if attempt < self.max_repairs:
                        current[i] = self._repair(reqs[i], g.text, str(e), kind)
                        retry.append(i)
            pending = retry
            if not pending:
                break
        return recs

    def run_many(self, inputs: Sequence[LoopInput]) -> list[LoopResult]:
        """Run the loop for many memes, batching each iteration's requests across memes."""
        results = [LoopResult("ok", [], visual_cues=x.visual_cues) for x in inputs]
        first = self._generate_parsed([self._first(x) for x in inputs], "explain")
        active = []
        for i, rec in enumerate(first):
            rec.iteration = 1
            results[i].iterations.append(rec)
            if rec.explanation is None:
                results[i].status, results[i].error, results[i].stop_reason = "failed", rec.error, "failed"
            else:
                results[i].final, results[i].text = rec.explanation, rec.text
                active.append(i)
        for it in range(2, self.iterations + 1):
            if not active:
                break
            recs = self._generate_parsed([self._critique(inputs[i], results[i].final) for i in active], "role_reversal")
            still = []
            for i, rec in zip(active, recs):
                rec.iteration = it
                res = results[i]
                res.iterations.append(rec)
                if rec.explanation is None:
                    res.stop_reason = f"iteration {it} failed; kept iteration {it - 1}"
                    continue
                rec.similarity = round(similarity(res.text, rec.text), 4)
                res.final, res.text = rec.explanation, rec.text
                if rec.similarity >= self.threshold:
                    res.stop_reason = f"converged at iteration {it} (similarity {rec.similarity:.2f})"
                    continue
                still.append(i)
            active = still
        for i in active:
            results[i].stop_reason = f"completed {self.iterations} iterations"
        if self.iterations == 1:
            for r in results:
                r.stop_reason = r.stop_reason or "completed 1 iteration"
        return results


def _one_line(s: str) -> str:
    return " / ".join(line.strip() for line in (s or "").splitlines() if line.strip())
