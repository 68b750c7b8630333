"""The parts of the demo's "Score a meme" page: its handlers (:class:`DemoHandlers`) and its layout
and event wiring (:class:`DemoPage`); :func:`dhumor.app.demo.build_demo` puts them together.

This module imports Gradio, so only the builder imports it (``dhumor.app.demo`` stays light).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import gradio as gr

from dhumor.app.access import Access, with_request
from dhumor.app.exports import export_for_user
from dhumor.app.render import decision_markdown, explanation_markdown, label_updates, redecide
from dhumor.app.text import md
from dhumor.errors import DataError
from dhumor.inference.pipeline import Pipeline
from dhumor.review.log import VERDICTS, ReviewLog

log = logging.getLogger("dhumor")

REVIEW_HEADERS = ["id", "time", "moderator", "file", "sha256", "model flagged", "verdict", "final flagged", "note"]


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


class DemoHandlers:
    """The page's event handlers. Each checks the signed-in user's role server-side, whatever the
    page shows or hides; ``run_pipe`` computes on the model thread (dhumor/app/model_calls.py)."""

    def __init__(self, pipe: Pipeline, review_log: ReviewLog, access: Access, run_pipe, exports_dir: str,
                 max_file_mb: float):
        self.pipe, self.review_log, self.access, self.run_pipe = pipe, review_log, access, run_pipe
        self.exports_dir, self.max_file_mb = exports_dir, max_file_mb
        self.has_explainer = pipe.explainer is not None
        self.used_by_model = "reasoning" in pipe.streams

    def empty_outputs(self, status: str) -> list:
        return ["", "", *[None for _ in self.pipe.schema.tasks], "", None, status]

    def analyze(self, image_path, caption, threshold, use_caption, request):
        """A generator: the page updates at every step (decision, then each explanation iteration)."""
        if not self.access.may(request, "score"):
            yield self.empty_outputs("**Sign in to score memes.**")
            return
        if not image_path:
            yield self.empty_outputs("Upload, paste or pick a meme.")
            return
        path = Path(image_path)
        size = path.stat().st_size if path.exists() else 0
        if size > self.max_file_mb * 1024 * 1024:
            yield self.empty_outputs(f"**{md(path.name)}** is {size / 2**20:.1f} MB; "
                                     f"the limit is {self.max_file_mb:g} MB.")
            return
        t0 = time.perf_counter()
        try:
            for result in self.run_pipe.stream_file(path, caption=caption if use_caption else None,
                                                    threshold=threshold):
                result["filename"] = path.name
                result["latency"] = round(time.perf_counter() - t0, 3)
                if result.get("error"):
                    yield self.empty_outputs(f"**This meme could not be scored:** {md(result['error'])}")
                    return
                pending = result.get("explanation_pending")
                status = (f"Explaining… ({result['latency']:.1f} s so far)" if pending
                          else f"Scored in {result['latency']:.2f} s.")
                yield [result.get("caption") or "",
                       explanation_markdown(result, self.has_explainer, self.used_by_model),
                       *label_updates(self.pipe, result), decision_markdown(self.pipe, result), result, status]
        except DataError as e:
            yield self.empty_outputs(f"**Cannot use this file:** {md(e.reason)}")
        except Exception as e:  # never a stack trace on the page; the log has it
            log.exception("scoring failed for %s", path)
            yield self.empty_outputs(f"**Something went wrong while scoring this meme** ({type(e).__name__}).")

    # Named generator functions (not lambdas returning generators): Gradio streams only what it can
    # see is a generator function.
    @with_request
    def on_upload(self, img, t, request):
        yield from self.analyze(img, None, t, False, request)

    @with_request
    def on_rescore(self, img, c, t, request):
        yield from self.analyze(img, c, t, True, request)

    def on_preset(self, p):
        return self.pipe.presets.get(p, gr.update())

    def on_threshold(self, result, threshold):
        if not result:
            return ["", *[gr.update() for _ in self.pipe.schema.tasks], result]
        result = redecide(self.pipe, result, threshold)
        return [decision_markdown(self.pipe, result), *label_updates(self.pipe, result), result]

    @with_request
    def record(self, result, threshold, preset, verdict, note, moderator, request):
        # The verdict on the scored meme, with what the moderator saw, into the review log.
        # (A comment, not a docstring: Gradio publishes a handler's docstring as its API description.)
        if not self.access.may(request, "review"):
            return "**Sign in to record verdicts.**", gr.update()
        if not result or not result.get("sha256") or not result.get("tasks"):
            return "Score a meme first.", gr.update()
        name = self.access.reviewer(request, moderator)
        try:
            result = redecide(self.pipe, result, threshold)
        except (KeyError, TypeError, ValueError):  # a state the page did not make (an API client's own)
            return "**Not recorded:** this is not a scored meme.", gr.update()
        dec, pipe, presets = result["decision"], self.pipe, self.pipe.presets
        out = {k: result.get(k) for k in ("tasks", "caption", "explanation", "timings")}
        preset_used = preset if preset in presets and abs(presets[preset] - threshold) < 1e-9 else None
        seen = {"probability": dec["probability"], "threshold": threshold, "preset": preset_used,
                "flagged": dec["flagged"]}
        rid = self.review_log.record(sha256=result["sha256"], filename=result.get("filename"), model_output=out,
                                     model_flagged=dec["flagged"], verdict=verdict, note=note, moderator=name,
                                     checkpoint=pipe.checkpoint, threshold=threshold,
                                     checkpoint_digest=pipe.checkpoint_digest, seen=seen,
                                     signed_in=self.access.signed_in)
        return f"Recorded review #{rid}: {md(verdict)}.", self.table(request)

    def table(self, request=None):
        # A reviewer sees their own verdicts; an admin (or the one user of an unshared demo) all of them.
        mine = None if self.access.may(request, "export") else (self.access.user(request) or "")
        rows = self.review_log.rows(limit=20, moderator=mine)
        return [[r["id"], r["created"], r["moderator"], r["filename"], r["sha256"][:12], bool(r["model_flagged"]),
                 r["verdict"], bool(r["final_flagged"]), r["note"]] for r in rows]

    @with_request
    def export(self, request):
        return export_for_user(self.access, request, self.exports_dir, "reviews", ".csv",
                               lambda out: f"Exported {self.review_log.export_csv(out)} reviews.")

    @with_request
    def on_load(self, request):
        admin = self.access.may(request, "export")
        who = self.access.user(request)
        hello = (f"Signed in as **{md(who)}** ({md(self.access.users.role(who))})" if who else "")
        return gr.update(visible=admin), gr.update(visible=admin), hello, self.table(request)


class DemoPage:
    """The page's components, created in page order inside an open ``gr.Blocks``."""

    def __init__(self, pipe: Pipeline, examples_dir: Path | None, signed_in: bool):
        schema = pipe.schema
        ckpt = Path(pipe.checkpoint)
        ckpt_name = "/".join(ckpt.parts[-2:]) if ckpt.name == "export" else ckpt.name
        gr.Markdown(f"# dhumor moderation demo\nCheckpoint: `{md(ckpt_name)}` · tasks: "
                    f"{', '.join(md(t.name) for t in schema.tasks)} · decision on **{md(schema.primary)}**")
        self.whoami = gr.Markdown(elem_id="whoami")
        self.result_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                self.image = SafeImage(type="filepath", sources=["upload", "clipboard"], label="Meme",
                                       elem_id="meme-input", height=360)
                if examples_dir and Path(examples_dir).is_dir():
                    gr.Examples([[str(p)] for p in sorted(Path(examples_dir).glob("*.jpg"))], inputs=[self.image],
                                label="Examples")
                self.caption = gr.Textbox(label="Caption (OCR; edit and press Enter to re-score)", lines=3,
                                          elem_id="caption")
                self.status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                self.decision = gr.Markdown(elem_id="decision")
                self.preset = gr.Radio(list(pipe.presets), value="balanced", label="Threshold preset",
                                       elem_id="preset")
                self.threshold = gr.Slider(0.0, 1.0, value=pipe.decider.threshold, step=0.01, label="Threshold",
                                           elem_id="threshold")
                self.labels = [gr.Label(label=t.name, num_top_classes=t.num_classes, elem_id=f"label-{t.name}")
                               for t in schema.tasks]
        self.explanation = gr.Markdown(elem_id="explanation")
        self._review_section(signed_in)

    def _review_section(self, signed_in: bool):
        with gr.Accordion("Review", open=True):
            with gr.Row():
                self.verdict = gr.Radio(list(VERDICTS), value="confirm", label="Verdict", elem_id="verdict")
                # Signed in, the verdict carries the user's name: no box to type someone else's.
                self.moderator = gr.Textbox(label="Moderator", elem_id="moderator", visible=not signed_in)
            self.note = gr.Textbox(label="Note", elem_id="note")
            with gr.Row():
                self.record_btn = gr.Button("Record verdict", variant="primary", elem_id="record")
                self.export_btn = gr.Button("Export CSV", elem_id="export", visible=not signed_in)
            self.review_status = gr.Markdown(elem_id="review-status")
            self.reviews = gr.Dataframe(value=None, headers=REVIEW_HEADERS, datatype="str", interactive=False,
                                        elem_id="reviews")
            self.export_file = gr.File(label="reviews.csv", elem_id="export-file", visible=not signed_in)

    def wire(self, blocks: gr.Blocks, on: DemoHandlers, concurrency: int):
        """Every event of the page, with its API name (clients and tests call them by name)."""
        outputs = [self.caption, self.explanation, *self.labels, self.decision, self.result_state, self.status]
        # The page says itself what is pending (decision, "Iteration n done…"); Gradio's full overlay
        # would redraw a timer on every output while a meme streams, CPU a small server shares with
        # its browser. Scoring events share one limit: that many memes are scored and explained at
        # once (their explanations decoded together), more wait their turn.
        score = dict(concurrency_limit=concurrency, concurrency_id="score", show_progress="minimal")
        self.image.change(on.on_upload, [self.image, self.threshold], outputs, api_name="analyze", **score)
        self.caption.submit(on.on_rescore, [self.image, self.caption, self.threshold], outputs, api_name="rescore",
                            **score)
        self.preset.change(on.on_preset, self.preset, self.threshold, api_name="preset")
        self.threshold.change(on.on_threshold, [self.result_state, self.threshold],
                              [self.decision, *self.labels, self.result_state], api_name="threshold")
        self.record_btn.click(on.record, [self.result_state, self.threshold, self.preset, self.verdict, self.note,
                                          self.moderator], [self.review_status, self.reviews], api_name="record")
        self.export_btn.click(on.export, None, [self.export_file, self.review_status], api_name="export")
        blocks.load(on.on_load, None, [self.export_btn, self.export_file, self.whoami, self.reviews],
                    api_name="whoami")
