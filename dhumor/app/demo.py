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

from dhumor.errors import DataError
from dhumor.app.model_thread import ModelThread
from dhumor.app.render import NO_EXPLAINER, explanation_markdown  # noqa: F401  (NO_EXPLAINER: public)
from dhumor.inference.pipeline import Pipeline
from dhumor.resources import EXAMPLES_DIR
from dhumor.review.log import VERDICTS, ReviewLog

log = logging.getLogger("dhumor")
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
               examples_dir: Path | None = EXAMPLES_DIR, queue: str | None = None, models: ModelThread | None = None,
               users=None, queue_root: str | None = None, concurrency: int = 4):
    """The demo's page. ``users`` (a :class:`~dhumor.app.auth.Users`): verdicts carry the signed-in
    user and each handler checks their role; ``queue_root``: admins open queues from the folders and
    results files directly under it; ``concurrency``: memes scored and explained at once."""
    import gradio as gr

    from dhumor.app.access import Access, Forbidden, with_request
    from dhumor.app.model_calls import pipeline_on
    from dhumor.app.text import md

    schema = pipe.schema
    presets = pipe.presets
    has_explainer = pipe.explainer is not None
    used_by_model = "reasoning" in pipe.streams
    models = models or ModelThread()  # every model call on one thread: dhumor/app/model_thread.py says why
    access = Access(users)
    # Compute on the model thread, explanation waits on the request's own thread: concurrent users'
    # explanations are decoded together (dhumor/app/model_calls.py).
    run_pipe = pipeline_on(models, pipe)
    exports = tempfile.TemporaryDirectory(prefix="dhumor-exports-")  # removed with the demo (see below)

    def _empty_outputs(status: str):
        return ["", "", *[None for _ in schema.tasks], "", None, status]

    def analyze(image_path, caption, threshold, use_caption: bool, request):
        """A generator: the page updates at every step (decision, then each explanation iteration)."""
        if not access.may(request, "score"):
            yield _empty_outputs("**Sign in to score memes.**")
            return
        if not image_path:
            yield _empty_outputs("Upload, paste or pick a meme.")
            return
        path = Path(image_path)
        size = path.stat().st_size if path.exists() else 0
        if size > max_file_mb * 1024 * 1024:
            yield _empty_outputs(f"**{md(path.name)}** is {size / 2**20:.1f} MB; the limit is {max_file_mb:g} MB.")
            return
        t0 = time.perf_counter()
        try:
            for result in run_pipe.stream_file(path, caption=caption if use_caption else None, threshold=threshold):
                result["filename"] = path.name
                result["latency"] = round(time.perf_counter() - t0, 3)
                if result.get("error"):
                    yield _empty_outputs(f"**This meme could not be scored:** {md(result['error'])}")
                    return
                pending = result.get("explanation_pending")
                status = (f"Explaining… ({result['latency']:.1f} s so far)" if pending
                          else f"Scored in {result['latency']:.2f} s.")
                yield [result.get("caption") or "", explanation_markdown(result, has_explainer, used_by_model),
                       *label_updates(pipe, result), decision_markdown(pipe, result), result, status]
        except DataError as e:
            yield _empty_outputs(f"**Cannot use this file:** {md(e.reason)}")
        except Exception as e:  # never a stack trace on the page; the log has it
            log.exception("scoring failed for %s", path)
            yield _empty_outputs(f"**Something went wrong while scoring this meme** ({type(e).__name__}).")

    def on_threshold(result, threshold):
        if not result:
            return ["", *[gr.update() for _ in schema.tasks], result]
        result = redecide(pipe, result, threshold)
        return [decision_markdown(pipe, result), *label_updates(pipe, result), result]


    @with_request
    def record(result, threshold, preset, verdict, note, moderator, request):
        if not access.may(request, "review"):
            return "**Sign in to record verdicts.**", gr.update()
        if not result or not result.get("sha256") or not result.get("tasks"):
            return "Score a meme first.", gr.update()
        name = access.reviewer(request, moderator)
        try:
            result = redecide(pipe, result, threshold)
        except (KeyError, TypeError, ValueError):  # a state the page did not make (an API client's own)
            return "**Not recorded:** this is not a scored meme.", gr.update()
        dec = result["decision"]
        out = {k: result.get(k) for k in ("tasks", "caption", "explanation", "timings")}
        preset_used = preset if preset in presets and abs(presets[preset] - threshold) < 1e-9 else None
        seen = {"probability": dec["probability"], "threshold": threshold, "preset": preset_used,
                "flagged": dec["flagged"]}
        rid = review_log.record(sha256=result["sha256"], filename=result.get("filename"), model_output=out,
                                model_flagged=dec["flagged"], verdict=verdict, note=note, moderator=name,
                                checkpoint=pipe.checkpoint, threshold=threshold,
                                checkpoint_digest=pipe.checkpoint_digest, seen=seen,
                                signed_in=access.signed_in)
        return f"Recorded review #{rid}: {md(verdict)}.", table(request)

    def table(request=None):
        # A reviewer sees their own verdicts; an admin (or the one user of an unshared demo) all of them.
        mine = None if access.may(request, "export") else (access.user(request) or "")
        rows = review_log.rows(limit=20, moderator=mine)
        return [[r["id"], r["created"], r["moderator"], r["filename"], r["sha256"][:12], bool(r["model_flagged"]),
                 r["verdict"], bool(r["final_flagged"]), r["note"]] for r in rows]


    @with_request
    def export(request):
        try:
            access.require(request, "export")
        except Forbidden as e:
            return None, f"**Not allowed:** {md(e)}"
        # One file per user, replaced by each export: clicks do not pile files up (Gradio serves a
        # copy from its own cache, which delete_cache below empties).
        out = Path(exports.name) / f"reviews-{access.user(request) or 'local'}.csv"
        review_log.export_csv(out)
        return str(out), f"Exported {len(review_log.rows())} reviews."


    @with_request
    def on_load(request):
        admin = access.may(request, "export")
        who = access.user(request)
        hello = (f"Signed in as **{md(who)}** ({md(users.role(who))})" if who else "")
        return gr.update(visible=admin), gr.update(visible=admin), hello, table(request)

    with gr.Blocks(title="dhumor — dark humor moderation", delete_cache=(600, 3600)) as demo:
        ckpt = Path(pipe.checkpoint)
        ckpt_name = "/".join(ckpt.parts[-2:]) if ckpt.name == "export" else ckpt.name
        gr.Markdown(f"# dhumor moderation demo\nCheckpoint: `{md(ckpt_name)}` · tasks: "
                    f"{', '.join(md(t.name) for t in schema.tasks)} · decision on **{md(schema.primary)}**")
        whoami = gr.Markdown(elem_id="whoami")
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
                # Signed in, the verdict carries the user's name: no box to type someone else's.
                moderator = gr.Textbox(label="Moderator", elem_id="moderator", visible=users is None)
            note = gr.Textbox(label="Note", elem_id="note")
            with gr.Row():
                record_btn = gr.Button("Record verdict", variant="primary", elem_id="record")
                export_btn = gr.Button("Export CSV", elem_id="export", visible=users is None)
            review_status = gr.Markdown(elem_id="review-status")
            reviews = gr.Dataframe(value=None, headers=["id", "time", "moderator", "file", "sha256", "model flagged",
                                                        "verdict", "final flagged", "note"],
                                   datatype="str", interactive=False, elem_id="reviews")
            export_file = gr.File(label="reviews.csv", elem_id="export-file", visible=users is None)

        outputs = [caption, explanation, *labels, decision, result_state, status]
        # Named generator functions (not lambdas returning generators): Gradio streams only what it can
        # see is a generator function.
        @with_request
        def on_upload(img, t, request):
            yield from analyze(img, None, t, False, request)


        @with_request
        def on_rescore(img, c, t, request):
            yield from analyze(img, c, t, True, request)

        def on_preset(p):
            return presets.get(p, gr.update())

        # The page says itself what is pending (decision, "Iteration n done…"); Gradio's full overlay
        # would redraw a timer on every output while a meme streams, CPU a small server shares with
        # its browser. Scoring events share one limit: that many memes are scored and explained at
        # once (their explanations decoded together), more wait their turn.
        score = dict(concurrency_limit=concurrency, concurrency_id="score", show_progress="minimal")
        image.change(on_upload, [image, threshold], outputs, api_name="analyze", **score)
        caption.submit(on_rescore, [image, caption, threshold], outputs, api_name="rescore", **score)
        preset.change(on_preset, preset, threshold, api_name="preset")
        threshold.change(on_threshold, [result_state, threshold], [decision, *labels, result_state],
                         api_name="threshold")
        record_btn.click(record, [result_state, threshold, preset, verdict, note, moderator], [review_status, reviews],
                         api_name="record")
        export_btn.click(export, None, [export_file, review_status], api_name="export")
        demo.load(on_load, None, [export_btn, export_file, whoami, reviews], api_name="whoami")
    if queue is not None or queue_root is not None:  # the review queue (dhumor/review/queue.py) as a second tab
        from dhumor.app.queue_tab import build_queue_tab

        demo = gr.TabbedInterface([demo, build_queue_tab(pipe, review_log, queue, models, access=access,
                                                         queue_root=queue_root, run_pipe=run_pipe,
                                                         exports_dir=exports.name)],
                                  ["Score a meme", "Review queue"], title="dhumor — dark humor moderation")
        # Gradio's copies of served files (exports, queue images) expire after an hour, and all go
        # when the server restarts; it reads this from the Blocks it launches.
        demo.delete_cache = (600, 3600)
    demo.queue(default_concurrency_limit=concurrency, max_size=64)  # more users than that wait their turn
    demo._dhumor_exports = exports  # the export folder lives (and is removed) with the demo
    return demo


def launch(pipe: Pipeline, review_log: ReviewLog, host: str = "127.0.0.1", port: int = 7860,
           max_file_mb: float = 10.0, block: bool = True, queue: str | None = None, models: ModelThread | None = None,
           users=None, queue_root: str | None = None, concurrency: int = 4):
    """Serve the demo; ``models``: the thread ``pipe`` was loaded on, if it was (its models then run there).
    With ``users``, Gradio's sign-in stands in front of every route (pages, API, files)."""
    demo = build_demo(pipe, review_log, max_file_mb=max_file_mb, queue=queue, models=models, users=users,
                      queue_root=queue_root, concurrency=concurrency)
    demo.launch(server_name=host, server_port=port, max_file_size=f"{int(max_file_mb * 1024)}kb", prevent_thread_lock=not block,
                show_error=False, allowed_paths=[str(EXAMPLES_DIR)], auth=users.check if users is not None else None,
                auth_message="dhumor moderation: sign in with the name and password your admin gave you.")
    return demo
