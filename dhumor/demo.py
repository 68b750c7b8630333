"""The moderation demo: upload a meme, see its caption, explanation, class probabilities and the
decision against a threshold; confirm or override it into the review log.

Labels come from the checkpoint's task schema, so a D-HUMOR checkpoint shows humor / target /
intensity and the HarMeme default shows harmful / harmfulness / target. Started by
``dhumor demo`` or ``python app/app.py``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from .errors import DataError
from .model_thread import ModelThread
from .pipeline import Pipeline
from .resources import EXAMPLES_DIR
from .review import VERDICTS, ReviewLog

log = logging.getLogger("dhumor")
NO_EXPLAINER = ("*No explanation backend is configured.* The decision uses the image and caption only. "
                "Start the demo with `--explain offline` (SmolLM2-135M, text only, a weak stand-in) or "
                "`--explain openai --model NAME --base-url URL` to use a real vision-language model.")


def explanation_markdown(result: dict, has_explainer: bool, used_by_model: bool) -> str:
    trail = result.get("explanation_trail")
    if not has_explainer:
        return NO_EXPLAINER
    if not trail:
        return "*Explaining the meme…*" if result.get("explanation_pending") else \
            "*No explanation was produced for this meme.*"
    from .explain.schema import FIELDS, LABELS

    parts = []
    if result.get("explanation_pending"):
        n = len(trail.get("iterations") or [])
        parts.append(f"*Iteration {n} done; the author is revising it…*")
    elif trail.get("status") != "ok":
        parts.append(f"**The explanation failed:** {trail.get('error') or 'unknown error'}")
    else:
        note = "" if used_by_model else " (shown for review; this checkpoint has no reasoning stream)"
        parts.append(f"**Explanation**{note} — {trail.get('stop_reason', '')}")
        parts += [f"- **{LABELS[f]}:** {trail['final'].get(f, '')}" for f in FIELDS if trail["final"].get(f)]
    if trail.get("visual_cues"):
        parts.append(f"\n*The text model was told the image shows:* {', '.join(trail['visual_cues'])}")
    for it in trail.get("iterations", []):
        kind = "explanation" if it["kind"] == "explain" else "role reversal: the author critiques and revises"
        sim = f", similarity to previous {it['similarity']:.2f}" if it.get("similarity") is not None else ""
        body = []
        if it.get("critique"):
            body.append(f"**Critique:**\n\n{it['critique']}")
        if it.get("text"):
            body.append(f"**{'Revised' if it['kind'] != 'explain' else 'Explanation'}:**\n\n{it['text']}")
        if it.get("error"):
            body.append(f"**Error:** {it['error']}")
        parts.append(f"\n<details><summary>Iteration {it['iteration']} — {kind}{sim}</summary>\n\n"
                     + "\n\n".join(body) + "\n\n</details>")
    return "\n".join(parts)


def redecide(pipe: Pipeline, result: dict, threshold: float) -> dict:
    """``result`` decided again at ``threshold`` from its stored probabilities (no model call): the
    decision and the gating of the other tasks both follow the threshold the moderator sets."""
    probs = {t.name: np.array([result["tasks"][t.name]["probs"][c] for c in t.classes]) for t in pipe.schema.tasks}
    return {**result, **pipe.decider.describe(probs, threshold, result.get("ood"))}


def decision_markdown(pipe: Pipeline, result: dict) -> str:
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


def _safe_image_class():
    import gradio as gr

    class SafeImage(gr.Image):
        """gr.Image that hands undecodable uploads to the pipeline (which says why) instead of failing
        in Gradio's own preprocessing with a blank error."""

        def get_block_name(self):
            return "image"  # the same front-end component

        def preprocess(self, payload):
            try:
                return super().preprocess(payload)
            except Exception:
                return getattr(payload, "path", None)

    return SafeImage


def build_demo(pipe: Pipeline, review_log: ReviewLog, max_file_mb: float = 10.0,
               examples_dir: Path | None = EXAMPLES_DIR, queue: str | None = None, models: ModelThread | None = None):
    import gradio as gr

    schema = pipe.schema
    presets = pipe.presets
    has_explainer = pipe.explainer is not None
    used_by_model = "reasoning" in pipe.streams
    models = models or ModelThread()  # every model call on one thread: dhumor/model_thread.py says why

    def _empty_outputs(status: str):
        return ["", "", *[None for _ in schema.tasks], "", None, status]

    def analyze(image_path, caption, threshold, use_caption: bool):
        """A generator: the page updates at every step (decision, then each explanation iteration)."""
        if not image_path:
            yield _empty_outputs("Upload, paste or pick a meme.")
            return
        path = Path(image_path)
        size = path.stat().st_size if path.exists() else 0
        if size > max_file_mb * 1024 * 1024:
            yield _empty_outputs(f"**{path.name}** is {size / 2**20:.1f} MB; the limit is {max_file_mb:g} MB.")
            return
        t0 = time.perf_counter()
        try:
            for result in models.iterate(pipe.stream_file(path, caption=caption if use_caption else None,
                                                          threshold=threshold)):
                result["filename"] = path.name
                result["latency"] = round(time.perf_counter() - t0, 3)
                if result.get("error"):
                    yield _empty_outputs(f"**This meme could not be scored:** {result['error']}")
                    return
                pending = result.get("explanation_pending")
                status = (f"Explaining… ({result['latency']:.1f} s so far)" if pending
                          else f"Scored in {result['latency']:.2f} s.")
                yield [result.get("caption") or "", explanation_markdown(result, has_explainer, used_by_model),
                       *label_updates(pipe, result), decision_markdown(pipe, result), result, status]
        except DataError as e:
            yield _empty_outputs(f"**Cannot use this file:** {e.reason}")
        except Exception as e:  # never a stack trace on the page; the log has it
            log.exception("scoring failed for %s", path)
            yield _empty_outputs(f"**Something went wrong while scoring this meme** ({type(e).__name__}).")

    def on_threshold(result, threshold):
        if not result:
            return ["", *[gr.update() for _ in schema.tasks], result]
        result = redecide(pipe, result, threshold)
        return [decision_markdown(pipe, result), *label_updates(pipe, result), result]

    def record(result, threshold, verdict, note, moderator):
        if not result:
            return "Score a meme first.", gr.update()
        result = redecide(pipe, result, threshold)
        dec = result["decision"]
        out = {k: result.get(k) for k in ("tasks", "caption", "explanation", "timings")}
        rid = review_log.record(sha256=result["sha256"], filename=result.get("filename"), model_output=out,
                                model_flagged=dec["flagged"], verdict=verdict, note=note, moderator=moderator,
                                checkpoint=pipe.checkpoint, threshold=threshold)
        return f"Recorded review #{rid}: {verdict}.", table()

    def table():
        rows = review_log.rows(limit=20)
        return [[r["id"], r["created"], r["filename"], r["sha256"][:12], bool(r["model_flagged"]), r["verdict"],
                 bool(r["final_flagged"]), r["note"]] for r in rows]

    def export():
        out = Path(tempfile.mkdtemp(prefix="dhumor-reviews-")) / "reviews.csv"
        return review_log.export_csv(out)

    with gr.Blocks(title="dhumor — dark humor moderation") as demo:
        ckpt = Path(pipe.checkpoint)
        ckpt_name = "/".join(ckpt.parts[-2:]) if ckpt.name == "export" else ckpt.name
        gr.Markdown(f"# dhumor moderation demo\nCheckpoint: `{ckpt_name}` · tasks: "
                    f"{', '.join(t.name for t in schema.tasks)} · decision on **{schema.primary}**")
        result_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = _safe_image_class()(type="filepath", sources=["upload", "clipboard"], label="Meme", elem_id="meme-input",
                                 height=360)
                if examples_dir and Path(examples_dir).is_dir():
                    gr.Examples([[str(p)] for p in sorted(Path(examples_dir).glob("*.jpg"))], inputs=[image],
                                label="Examples")
                caption = gr.Textbox(label="Caption (OCR; edit and press Enter to re-score)", lines=3,
                                     elem_id="caption")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                decision = gr.Markdown(elem_id="decision")
                preset = gr.Radio(list(presets), value="balanced", label="Threshold preset", elem_id="preset")
                threshold = gr.Slider(0.0, 1.0, value=pipe.decider.threshold, step=0.01, label="Threshold",
                                      elem_id="threshold")
                labels = [gr.Label(label=t.name, num_top_classes=t.num_classes, elem_id=f"label-{t.name}")
                          for t in schema.tasks]
        explanation = gr.Markdown(elem_id="explanation")
        with gr.Accordion("Review", open=True):
            with gr.Row():
                verdict = gr.Radio(list(VERDICTS), value="confirm", label="Verdict", elem_id="verdict")
                moderator = gr.Textbox(label="Moderator", elem_id="moderator")
            note = gr.Textbox(label="Note", elem_id="note")
            with gr.Row():
                record_btn = gr.Button("Record verdict", variant="primary", elem_id="record")
                export_btn = gr.Button("Export CSV", elem_id="export")
            review_status = gr.Markdown(elem_id="review-status")
            reviews = gr.Dataframe(value=table(), headers=["id", "time", "file", "sha256", "model flagged", "verdict",
                                                           "final flagged", "note"], interactive=False,
                                   elem_id="reviews")
            export_file = gr.File(label="reviews.csv", elem_id="export-file")

        outputs = [caption, explanation, *labels, decision, result_state, status]
        # Named generator functions (not lambdas returning generators): Gradio streams only what it can
        # see is a generator function.
        def on_upload(img, t):
            yield from analyze(img, None, t, False)

        def on_rescore(img, c, t):
            yield from analyze(img, c, t, True)

        # The page says itself what is pending (decision, "Iteration n done…"); Gradio's full overlay
        # would redraw a timer on every output while a meme streams, CPU a small server shares with
        # its browser.
        image.change(on_upload, [image, threshold], outputs, api_name="analyze", show_progress="minimal")
        caption.submit(on_rescore, [image, caption, threshold], outputs, api_name="rescore",
                       show_progress="minimal")
        preset.change(lambda p: presets[p], preset, threshold)
        threshold.change(on_threshold, [result_state, threshold], [decision, *labels, result_state])
        record_btn.click(record, [result_state, threshold, verdict, note, moderator], [review_status, reviews],
                         api_name="record")
        export_btn.click(export, None, export_file)
    if queue is not None:  # the review queue (dhumor/review_queue.py) as a second tab
        from .review_queue import build_queue_tab

        demo = gr.TabbedInterface([demo, build_queue_tab(pipe, review_log, queue, models)], ["Score a meme", "Review queue"],
                                  title="dhumor — dark humor moderation")
    demo.queue(default_concurrency_limit=1, max_size=64)  # one model, many users: requests wait their turn
    return demo


def launch(pipe: Pipeline, review_log: ReviewLog, host: str = "127.0.0.1", port: int = 7860,
           max_file_mb: float = 10.0, block: bool = True, queue: str | None = None, models: ModelThread | None = None):
    """Serve the demo; ``models``: the thread ``pipe`` was loaded on, if it was (its models then run there)."""
    demo = build_demo(pipe, review_log, max_file_mb=max_file_mb, queue=queue, models=models)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{int(max_file_mb * 1024)}kb", prevent_thread_lock=not block,
                show_error=False, allowed_paths=[str(EXAMPLES_DIR)])
    return demo
