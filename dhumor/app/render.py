"""How a result row reads on a page: the explanation with its Role-Reversal trail (model text escaped)."""
from __future__ import annotations

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
