"""How a result row reads on a page: its decision at the moderator's threshold, its class
probabilities, and the explanation with its Role-Reversal trail (model text escaped)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from dhumor.inference.pipeline import Pipeline

NO_EXPLAINER = ("*No explanation backend is configured.* The decision uses the image and caption only. "
                "Start the demo with `--explain offline` (SmolLM2-135M, text only, a weak stand-in) or "
                "`--explain openai --explain-model NAME --base-url URL` to use a real vision-language model.")


def explanation_markdown(result: dict, has_explainer: bool, used_by_model: bool) -> str:
    trail = result.get("explanation_trail")
    if not has_explainer:
        return NO_EXPLAINER
    if not trail:
        return "*Explaining the meme…*" if result.get("explanation_pending") else \
            "*No explanation was produced for this meme.*"
    from dhumor.app.text import md
    from dhumor.explain.schema import FIELDS, LABELS

    parts = []  # model text is escaped: a caption can steer the model into writing markup
    if result.get("explanation_pending"):
        n = len(trail.get("iterations") or [])
        parts.append(f"*Iteration {n} done; the author is revising it…*")
    elif trail.get("status") != "ok":
        parts.append(f"**The explanation failed:** {md(trail.get('error') or 'unknown error')}")
    else:
        note = "" if used_by_model else " (shown for review; this checkpoint has no reasoning stream)"
        parts.append(f"**Explanation**{note} — {md(trail.get('stop_reason', ''))}")
        parts += [f"- **{LABELS[f]}:** {md(trail['final'].get(f, ''))}" for f in FIELDS if trail["final"].get(f)]
    if trail.get("visual_cues"):
        parts.append(f"\n*The text model was told the image shows:* {md(', '.join(trail['visual_cues']))}")
    for it in trail.get("iterations", []):
        kind = "explanation" if it["kind"] == "explain" else "role reversal: the author critiques and revises"
        sim = f", similarity to previous {it['similarity']:.2f}" if it.get("similarity") is not None else ""
        body = []
        if it.get("critique"):
            body.append(f"**Critique:**\n\n{md(it['critique'])}")
        if it.get("text"):
            body.append(f"**{'Revised' if it['kind'] != 'explain' else 'Explanation'}:**\n\n{md(it['text'])}")
        if it.get("error"):
            body.append(f"**Error:** {md(it['error'])}")
        parts.append(f"\n<details><summary>Iteration {it['iteration']} — {kind}{sim}</summary>\n\n"
                     + "\n\n".join(body) + "\n\n</details>")
    return "\n".join(parts)


def redecide(pipe: Pipeline, result: dict, threshold: float) -> dict:
    """``result`` decided again at ``threshold`` from its stored probabilities (no model call): the
    decision and the gating of the other tasks both follow the threshold the moderator sets."""
    probs = {t.name: np.array([result["tasks"][t.name]["probs"][c] for c in t.classes]) for t in pipe.schema.tasks}
    return {**result, **pipe.decider.describe(probs, threshold, result.get("ood"))}


def decision_markdown(pipe: Pipeline, result: dict) -> str:
    """The decision as the page heads it: flag or not, the probability against the threshold."""
    dec = result.get("decision")
    if dec is None:  # the model reads the explanation: it decides once the explanation is final
        return "## Decision: pending\nthe model reads the explanation; it decides when the explanation is final"
    flagged, p, th = dec["flagged"], dec["probability"], dec["threshold"]
    verb = "FLAG" if flagged else "do not flag"
    text = (f"## Decision: {verb}\n{pipe.schema.primary} probability **{p:.2f}** {'≥' if flagged else '<'} "
            f"threshold **{th:.2f}**")
    return text + unfamiliar_markdown(result)


def unfamiliar_markdown(result: dict) -> str:
    """The unfamiliarity score and why the model abstains, if it does (empty without a score)."""
    dec, ood = result.get("decision") or {}, result.get("ood")
    text = ""
    if ood:
        text = f"\n\nunfamiliarity **{ood['score']:.3f}**: " + ("**unlike the memes it was trained on**"
                                                               if ood["unfamiliar"] else "familiar")
    if dec.get("abstain"):
        why = {"unfamiliar": "this meme is unlike its training memes",
               "uncertain": "its probability is too close to the threshold"}.get(dec.get("reason"), dec.get("reason"))
        text += f"\n\n**The model abstains**: {why}; a moderator should decide."
    elif dec.get("reason") == "unfamiliar":
        text += "\n\nflagged for a moderator because it is unfamiliar"
    return text


def label_updates(pipe: Pipeline, result: dict) -> list:
    """One ``gr.Label`` update per task: its class probabilities, titled by whether the task applies."""
    import gradio as gr

    if not result.get("tasks"):
        return [gr.update(value=None) for _ in pipe.schema.tasks]
    out = []
    for t in pipe.schema.tasks:
        r = result["tasks"][t.name]
        title = t.name
        if r["label"] is None:  # a gated task whose gate is negative: scores shown, no class claimed
            title = f"{t.name}: not applicable ({t.gate} = {result['tasks'][t.gate]['label']}); scores only"
        out.append(gr.update(value=r["probs"], label=title))
    return out
