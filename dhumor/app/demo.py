"""The moderation demo: upload a meme, see its caption, explanation, class probabilities and the
decision against a threshold; confirm or override it into the review log.

Labels come from the checkpoint's task schema, so a D-HUMOR checkpoint shows humor / target /
intensity and the HarMeme default shows harmful / harmfulness / target. Started by
``dhumor demo`` or ``python app/app.py``. The page's handlers and layout are in
:mod:`dhumor.app.demo_page`, imported when a demo is built (it imports Gradio).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from dhumor.app.model_thread import ModelThread
from dhumor.app.render import (NO_EXPLAINER, decision_markdown, explanation_markdown, label_updates, redecide,
                               unfamiliar_markdown)
from dhumor.inference.pipeline import Pipeline
from dhumor.resources import EXAMPLES_DIR
from dhumor.review.log import ReviewLog

# The page's text helpers live in dhumor.app.render; they stay importable from here, as before.
__all__ = ["build_demo", "launch", "NO_EXPLAINER", "decision_markdown", "explanation_markdown", "label_updates",
           "redecide", "unfamiliar_markdown"]


def build_demo(pipe: Pipeline, review_log: ReviewLog, max_file_mb: float = 10.0,
               examples_dir: Path | None = EXAMPLES_DIR, queue: str | None = None, models: ModelThread | None = None,
               users=None, queue_root: str | None = None, concurrency: int = 4):
    """The demo's page. ``users`` (a :class:`~dhumor.app.auth.Users`): verdicts carry the signed-in
    user and each handler checks their role; ``queue_root``: admins open queues from the folders and
    results files directly under it; ``concurrency``: memes scored and explained at once."""
    import gradio as gr

    from dhumor.app.access import Access
    from dhumor.app.demo_page import DemoHandlers, DemoPage
    from dhumor.app.model_calls import pipeline_on

    models = models or ModelThread()  # every model call on one thread: dhumor/app/model_thread.py says why
    access = Access(users)
    # Compute on the model thread, explanation waits on the request's own thread: concurrent users'
    # explanations are decoded together (dhumor/app/model_calls.py).
    run_pipe = pipeline_on(models, pipe)
    exports = tempfile.TemporaryDirectory(prefix="dhumor-exports-")  # removed with the demo (see below)
    handlers = DemoHandlers(pipe, review_log, access, run_pipe, exports.name, max_file_mb)
    with gr.Blocks(title="dhumor — dark humor moderation", delete_cache=(600, 3600)) as demo:
        DemoPage(pipe, examples_dir, signed_in=access.signed_in).wire(demo, handlers, concurrency)
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
