"""From class probabilities to labels and a moderation decision: one place, used by every command.

A :class:`Decider` is resolved once from a checkpoint's metadata: its calibration (a temperature
per task, fitted on the split the checkpoint was selected on) and its threshold presets for the
primary task (chosen on that split after calibration). ``score``, ``predict``, ``evaluate``, the
demo and the notebook all decide through it, so the same meme gets the same decision everywhere.

>>> from dhumor.schema import get_schema
>>> d = Decider(get_schema("harmeme"), presets={"balanced": 0.4})
>>> d.threshold
0.4
"""
from __future__ import annotations

import logging
from typing import Mapping

import numpy as np
from dhumor.errors import InvalidValueError

from dhumor.schema import TaskSchema

log = logging.getLogger("dhumor")
DEFAULT_THRESHOLD = 0.5
DEFAULT_PRESET = "balanced"
ON_UNFAMILIAR = ("abstain", "flag", "ignore")


class Decider:
    """Calibrates probabilities and turns them into labels and a decision on the primary task."""

    def __init__(self, schema: TaskSchema, presets: Mapping[str, float] | None = None,
                 temperatures: Mapping[str, float] | None = None, threshold: float | None = None,
                 on_unfamiliar: str = "abstain", uncertain_margin: float | None = None):
        """``presets``: named thresholds of the primary task; ``temperatures``: per task, divides the
        logits before the softmax; ``threshold`` overrides the balanced preset. ``on_unfamiliar``: what
        an unfamiliar meme's decision is (``abstain``: abstain, reason "unfamiliar"; ``flag``: flagged
        for a moderator; ``ignore``: decided as any other); ``uncertain_margin``: abstain (reason
        "uncertain") when P(positive) lies within it of the threshold (None: never)."""
        if on_unfamiliar not in ON_UNFAMILIAR:
            raise ValueError(f"on_unfamiliar must be one of {list(ON_UNFAMILIAR)}, not {on_unfamiliar!r}")
        self.schema = schema
        self.on_unfamiliar = on_unfamiliar
        self.uncertain_margin = None if uncertain_margin is None else float(uncertain_margin)
        self.presets = dict(presets) if presets else {DEFAULT_PRESET: DEFAULT_THRESHOLD}
        self.presets_from_checkpoint = bool(presets)
        self.temperatures = {k: float(v) for k, v in (temperatures or {}).items() if float(v) != 1.0}
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise InvalidValueError(f"the decision threshold must lie in [0, 1], got {threshold}")
        self.threshold = float(threshold if threshold is not None
                               else self.presets.get(DEFAULT_PRESET, DEFAULT_THRESHOLD))

    @classmethod
    def from_meta(cls, schema: TaskSchema, meta: Mapping | None, threshold: float | None = None,
                  on_unfamiliar: str = "abstain", abstain_uncertain: bool = False) -> "Decider":
        """From a checkpoint's ``dhumor.json`` (``thresholds``, ``calibration`` and ``abstention`` keys, all
        optional). ``abstain_uncertain`` turns on the checkpoint's confidence-abstention preset."""
        meta = meta or {}
        cal = meta.get("calibration") or {}
        temps = {t: v["temperature"] for t, v in cal.items() if isinstance(v, Mapping) and "temperature" in v}
        margin = None
        if abstain_uncertain:
            margin = (meta.get("abstention") or {}).get("uncertain_margin")
            if margin is None:
                raise InvalidValueError("this checkpoint has no confidence-abstention preset (dhumor.json 'abstention'; "
                                 "fitted by `dhumor fit`); leave out --abstain-uncertain")
        return cls(schema, meta.get("thresholds"), temps, threshold, on_unfamiliar, margin)

    @classmethod
    def from_module(cls, module, threshold: float | None = None, on_unfamiliar: str = "abstain",
                    abstain_uncertain: bool = False) -> "Decider":
        """From a loaded module (its ``checkpoint_meta`` when it came from a checkpoint)."""
        return cls.from_meta(module.schema, getattr(module, "checkpoint_meta", None), threshold, on_unfamiliar,
                             abstain_uncertain)

    # ------------------------------------------------------------ probabilities
    def calibrate(self, probs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Temperature-scaled probabilities: softmax(log p / T) equals softmax(logits / T)."""
        out = {}
        for task, p in probs.items():
            p = np.asarray(p, dtype=np.float64)
            t = self.temperatures.get(task)
            if t:
                z = np.log(np.clip(p, 1e-12, 1.0)) / t
                z -= z.max(axis=-1, keepdims=True)
                p = np.exp(z)
                p /= p.sum(axis=-1, keepdims=True)
            out[task] = p
        return out

    # ------------------------------------------------------------ decisions
    def describe(self, probs: Mapping[str, np.ndarray], threshold: float | None = None,
                 ood: Mapping | None = None) -> dict:
        """One meme's per-task label and (already calibrated) class probabilities, and the decision.

        The primary task is positive when P(positive) >= threshold; other tasks take their most
        probable class. A gated task (the target of a harmful meme) gets no label when its gate,
        decided at the same threshold, is negative; a task that grades the decided one (harmfulness)
        takes its negative class or its most probable positive level: both follow the threshold in use.

        ``ood`` (``{"score", "unfamiliar"}`` or None) sets ``abstain`` and ``reason``: an unfamiliar meme
        abstains (reason "unfamiliar"), is flagged, or is decided as usual, per ``on_unfamiliar``; a
        meme within ``uncertain_margin`` of the threshold abstains (reason "uncertain"). ``flagged``
        stays the model's call at the threshold, except under ``on_unfamiliar="flag"``.
        """
        th = self.threshold if threshold is None else float(threshold)
        schema = self.schema
        tasks: dict[str, dict] = {}
        for t in schema.tasks:
            p = np.asarray(probs[t.name], dtype=float)
            idx = int(p[1] >= th) if t.name == schema.primary else int(p.argmax())
            tasks[t.name] = {"label": t.classes[idx], "probs": {c: round(float(v), 6) for c, v in zip(t.classes, p)}}
        for t in schema.tasks:
            if t.refines and t.refines in tasks:  # grades of the decided task agree with it
                p = np.asarray(probs[t.name], dtype=float)
                positive = tasks[t.refines]["label"] == schema.task(t.refines).classes[1]
                tasks[t.name]["label"] = t.classes[1 + int(p[1:].argmax())] if positive else t.classes[0]
        for t in schema.tasks:
            if t.gate and tasks[t.gate]["label"] != schema.task(t.gate).classes[1]:
                tasks[t.name]["label"] = None
        p_pos = float(np.asarray(probs[schema.primary])[1])
        flagged, abstain, reason = bool(p_pos >= th), False, None
        if ood and ood.get("unfamiliar") and self.on_unfamiliar != "ignore":
            reason = "unfamiliar"
            if self.on_unfamiliar == "abstain":
                abstain = True
            else:  # "flag": an unfamiliar meme goes to a moderator as flagged
                flagged = True
        elif self.uncertain_margin is not None and abs(p_pos - th) < self.uncertain_margin:
            abstain, reason = True, "uncertain"
        decision = {"task": schema.primary, "flagged": flagged, "threshold": th,
                    "probability": round(p_pos, 6), "abstain": abstain, "reason": reason}
        return {"tasks": tasks, "decision": decision}

