"""From class probabilities to labels and a moderation decision, honouring gated tasks."""
from __future__ import annotations

import numpy as np

from .schema import TaskSchema


def describe(schema: TaskSchema, probs: dict[str, np.ndarray], thresholds: dict[str, float] | None = None) -> dict:
    """One meme's per-task label and class probabilities, and the decision on the primary task.

    A binary task with a threshold is positive when P(positive) >= threshold (default 0.5 for the
    primary task); other tasks take the most probable class. A gated task (the target of a harmful
    meme) gets no label when its gate is negative.
    """
    th = {schema.primary: 0.5, **(thresholds or {})}
    tasks: dict[str, dict] = {}
    for t in schema.tasks:
        p = np.asarray(probs[t.name], dtype=float)
        idx = int(p[1] >= th[t.name]) if t.binary and t.name in th else int(p.argmax())
        tasks[t.name] = {"label": t.classes[idx], "probs": {c: round(float(v), 6) for c, v in zip(t.classes, p)}}
    for t in schema.tasks:
        if t.gate and tasks[t.gate]["label"] != schema.task(t.gate).classes[1]:
            tasks[t.name]["label"] = None
    p_pos = float(np.asarray(probs[schema.primary])[1])
    decision = {"task": schema.primary, "flagged": bool(p_pos >= th[schema.primary]),
                "threshold": th[schema.primary], "probability": round(p_pos, 6)}
    return {"tasks": tasks, "decision": decision}
