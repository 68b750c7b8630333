"""The review queue's page: the demo's second tab over a :class:`~dhumor.review.queue.ReviewQueue`.

:class:`QueueHandlers` holds the page's shared state (the open queues) and its event handlers,
:class:`QueuePage` its components and wiring. This module imports Gradio: only the demo's builder
imports it.
"""
from __future__ import annotations

import tempfile
import threading
from pathlib import Path

import gradio as gr

from dhumor.app.access import Access, Forbidden, with_request
from dhumor.app.exports import export_for_user
from dhumor.app.model_calls import pipeline_on
from dhumor.app.render import explanation_markdown
from dhumor.app.text import md
from dhumor.images import load_image
from dhumor.review.export import export_reviews
from dhumor.review.log import ReviewLog
from dhumor.review.queue import ORDERS, ReviewQueue, default_labels, load_queue_rows, queue_candidates
from dhumor.schema import TaskSchema

KEYS_HELP = ("Keys (outside text boxes): **y** / **n** set the primary task, **1**–**9** pick a class of the "
             "next task, **s** saves the verdict and moves on, **k** skips.")


def model_markdown(schema: TaskSchema, row: dict) -> str:
    dec = row["decision"]
    lines = [f"### Model: {'FLAG' if dec['flagged'] else 'do not flag'}",
             f"{schema.primary} probability **{dec['probability']:.2f}** against threshold **{dec['threshold']:.2f}**", ""]
    for t in schema.tasks:
        tr = row["tasks"][t.name]
        probs = ", ".join(f"{c} {p:.2f}" for c, p in tr["probs"].items())
        lines.append(f"- **{t.name}**: {tr['label'] or 'not applicable'} ({probs})")
    return "\n".join(lines)


def _keyboard_js(schema: TaskSchema) -> str:
    """Shortcuts for the verdict controls; ignored while typing in a text box."""
    prim = schema.primary
    nxt = next((t.name for t in schema.tasks if t.name != prim and t.gate is None), None)
    return """() => {
  if (window.__dhumorQueueKeys) return; window.__dhumorQueueKeys = true;
  const pick = (task, i) => { const el = document.querySelectorAll('#verdict-' + task + ' input[type=radio]')[i];
                               if (el) el.click(); };
  document.addEventListener('keydown', (e) => {
    const tag = (e.target.tagName || '').toLowerCase();
    if (tag === 'textarea' || tag === 'input' && e.target.type !== 'radio' || e.ctrlKey || e.metaKey || e.altKey) return;
    if (!document.querySelector('#queue-save')) return;
    if (e.key === 'y') pick('PRIM', 1);
    else if (e.key === 'n') pick('PRIM', 0);
    else if (e.key === 's') document.querySelector('#queue-save').click();
    else if (e.key === 'k') document.querySelector('#queue-skip').click();
    else if (NEXT && e.key >= '1' && e.key <= '9') pick(NEXT, parseInt(e.key) - 1);
    else return;
    e.preventDefault();
  });
}""".replace("PRIM", prim).replace("NEXT", repr(nxt) if nxt else "null")


def build_queue_tab(pipe, review_log: ReviewLog, source: str | None = None, models=None, access=None,
                    queue_root: str | None = None, run_pipe=None, exports_dir: str | None = None):
    """The review queue page (a ``gr.Blocks``); the demo shows it as its second tab.

    Queues come only from ``source`` (``--queue``, given when the demo starts) or from the entries
    of ``queue_root`` that an admin opens from a list; a visitor never types a server path.
    ``run_pipe``: the pipeline whose compute runs on the demo's model thread (a folder is scored
    with it); ``access``: who may do what (:class:`~dhumor.app.access.Access`)."""
    access = access or Access(None)
    if run_pipe is None:
        run_pipe = pipeline_on(models, pipe) if models is not None else pipe
    page_exports = None
    if exports_dir is None:  # a page of its own: its folder lives (and is removed) with the page
        page_exports = tempfile.TemporaryDirectory(prefix="dhumor-reviewed-")
        exports_dir = page_exports.name
    handlers = QueueHandlers(pipe, review_log, access, run_pipe, source, queue_root, exports_dir)
    with gr.Blocks(title="dhumor — review queue") as page:
        QueuePage(pipe.schema, list(handlers.opened), signed_in=access.signed_in).wire(page, handlers)
        page.load(None, None, None, js=_keyboard_js(pipe.schema))
    if page_exports is not None:
        page._dhumor_exports = page_exports
    return page


class QueueHandlers:
    """The queue page's event handlers and the state every session shares: the open queues (an
    admin opens, reviewers review) and each queue scored once per order and seed."""

    def __init__(self, pipe, review_log: ReviewLog, access: Access, run_pipe, source: str | None,
                 queue_root: str | None, exports_dir: str):
        self.pipe, self.schema, self.review_log, self.access, self.run_pipe = (pipe, pipe.schema, review_log,
                                                                                 access, run_pipe)
        self.source = source
        self.root = Path(queue_root).resolve() if queue_root else None
        self.exports = Path(exports_dir)
        self.cache: dict[tuple, ReviewQueue] = {}
        self.loading = threading.Lock()  # one queue scored at a time; a second request for it waits, then reuses it
        self.opened: dict[str, Path] = {}  # name -> source, shared by every session
        if source:
            self.opened[Path(source).name] = Path(source)
        self.n_out = 7 + len(self.schema.tasks)  # len(outputs) in QueuePage.wire

    def get_queue(self, name: str, order: str, seed: float) -> ReviewQueue:
        if name not in self.opened:
            raise ValueError(f"no open queue named {name!r}" if name else "no queue is open yet")
        key = (name, order, int(seed))
        with self.loading:
            if key not in self.cache:
                path, rows = load_queue_rows(self.opened[name], self.run_pipe, self.review_log)
                self.cache[key] = ReviewQueue(rows, path, self.review_log, self.schema, order, int(seed))
        return self.cache[key]

    def image_of(self, row: dict):
        path, source = Path(row["path"]), self.source
        if self.root is not None and self.opened and not path.resolve().is_relative_to(self.root) and \
                not any(path.resolve().is_relative_to(Path(s).resolve().parent) for s in ([source] if source else [])):
            raise ValueError("the image is outside the queue root; not shown")
        return load_image(path)

    def show(self, state: dict, reviewer: str, status: str = "") -> list:
        """The page's outputs for ``state``: the next meme ``reviewer`` has not reviewed, or why none."""
        schema = self.schema
        blank = [state, None, "", "", "", *[gr.update(value=None) for _ in schema.tasks], "", status]
        if not state.get("source"):
            blank[-2] = ("Pick a queue." if self.opened else
                         "No queue is open yet" + (": an admin opens one from the queue root." if self.root else "."))
            return blank
        try:
            q = self.get_queue(state["source"], state["order"], state["seed"])
        except ValueError as e:
            blank[-1] = f"**Cannot open the queue:** {md(e)}"
            return blank
        prog = self._progress(q, state, reviewer)
        row = q.next_item(reviewer, set(state.get("skipped", [])))
        state = {**state, "current": row["id"] if row else None}
        if row is None:
            return [state, None, "", "*Nothing left to review in this order.*", "",
                    *[gr.update(value=None) for _ in schema.tasks], prog, status]
        try:
            img = self.image_of(row)
        except Exception as e:  # the file moved or broke since scoring: say so, keep the verdict controls
            img, status = None, f"{status} **Cannot show {md(Path(row['path']).name)}:** {md(e)}"
        defaults = default_labels(schema, row)
        return [state, img, row.get("caption") or "", model_markdown(schema, row),
                explanation_markdown(row, row.get("explanation_trail") is not None, "reasoning" in self.pipe.streams),
                *[gr.update(value=defaults[t.name]) for t in schema.tasks], prog + f" · now: {md(row['id'])}", status]

    @staticmethod
    def _progress(q: ReviewQueue, state: dict, reviewer: str) -> str:
        done, total = q.progress(reviewer)
        prog = (f"**{done} of {total} reviewed** by {md(reviewer) or '(enter your name)'} · queue: "
                f"{md(state['source'])} · order: {md(state['order'])}")
        unfamiliar = sum(bool((r.get("ood") or {}).get("unfamiliar")) for r in q.rows)
        if any(r.get("ood") for r in q.rows):
            prog += f" · {unfamiliar} unfamiliar ({unfamiliar / max(1, total):.0%})"
        return prog

    @with_request
    def start(self, name, order, seed, reviewer, request):
        """Review queue ``name`` (one already open) in ``order``."""
        if not self.access.may(request, "review"):
            return self.show({}, "", "**Sign in to review.**")
        order = order if order in ORDERS else "uncertain"
        return self.show({"source": name if name in self.opened else "", "order": order, "seed": int(seed or 0),
                          "skipped": []}, self.access.reviewer(request, reviewer))

    @with_request
    def open_from_root(self, entry, order, seed, reviewer, request):
        """An admin opens an entry of the queue root (chosen from the list; anything else is refused)."""
        try:
            self.access.require(request, "open_queue")
            found = queue_candidates(self.root)
            if entry not in found:
                raise ValueError(f"{entry!r} is not in the queue root's list")
        except (Forbidden, ValueError) as e:
            return [gr.update(), *self.show({}, self.access.reviewer(request, reviewer), f"**Not opened:** {md(e)}")]
        self.opened[entry] = found[entry]
        out = self.show({"source": entry, "order": order if order in ORDERS else "uncertain", "seed": int(seed or 0),
                         "skipped": []}, self.access.reviewer(request, reviewer))
        return [gr.update(choices=list(self.opened), value=entry), *out]

    @with_request
    def save(self, request, state, reviewer, caption, note, *labels):  # the request first: labels vary
        # The reviewer's labels for the meme on the page, into the review log; then the next meme.
        # (A comment, not a docstring: Gradio publishes a handler's docstring as its API description.)
        reviewer = self.access.reviewer(request, reviewer)
        if not self.access.may(request, "review"):
            return self.show({}, "", "**Sign in to review.**")
        q_row = None
        if state.get("current") and state.get("source") in self.opened:
            q = self.get_queue(state["source"], state["order"], state["seed"])
            q_row = q.by_id.get(state["current"])
        if q_row is None:
            return self.show(state, reviewer, "Open a queue first.")
        dec = q_row["decision"]
        seen = {"probability": dec["probability"], "threshold": dec["threshold"], "preset": q_row.get("preset"),
                "flagged": dec["flagged"], "order": state["order"]}
        try:
            rid = q.record(q_row, dict(zip(self.schema.task_names, labels)), reviewer, note=note, caption=caption,
                           checkpoint=self.pipe.checkpoint, checkpoint_digest=self.pipe.checkpoint_digest,
                           seen=seen, signed_in=self.access.signed_in)
        except ValueError as e:
            out = self.show(state, reviewer, f"**Not recorded:** {md(e)}")
            return out[:1] + [gr.update()] * (self.n_out - 2) + out[-2:]  # keep the meme and the edits on the page
        return self.show(state, reviewer, f"Recorded review #{rid} for {md(q_row['id'])}.")

    @with_request
    def skip(self, state, reviewer, request):
        if state.get("current"):
            state = {**state, "skipped": [*state.get("skipped", []), state["current"]]}
        return self.show(state, self.access.reviewer(request, reviewer), "Skipped.")

    @with_request
    def export(self, request):
        # The reviewed memes as a training manifest in the schema's own format (`dhumor fit` reads it).
        suffix = ".jsonl" if self.schema.name != "dhumor" else ".csv"
        return export_for_user(self.access, request, self.exports, "reviewed", suffix, self._write_manifest)

    def _write_manifest(self, out: Path) -> str:
        rep = export_reviews(self.review_log, out, schema=self.schema)
        return (f"Exported {rep.written} memes; {len(rep.conflicts)} conflicts left out; "
                f"{len(rep.skipped)} unusable.")

    @with_request
    def on_load(self, order, seed, reviewer, request):
        admin = self.access.may(request, "open_queue") and self.root is not None
        first = next(iter(self.opened), "")
        pick = gr.update(choices=list(self.opened), value=first)
        roots = gr.update(choices=list(queue_candidates(self.root)), visible=admin)
        show_export = self.access.may(request, "export")
        return [pick, roots, gr.update(visible=admin), gr.update(visible=show_export), gr.update(visible=show_export),
                *self.start(first, order, seed, reviewer, request)]


class QueuePage:
    """The queue page's components, created in page order inside an open ``gr.Blocks``."""

    def __init__(self, schema: TaskSchema, queues: list[str], signed_in: bool):
        self.schema = schema
        gr.Markdown(f"## Review queue\n{KEYS_HELP}")
        self.state = gr.State({})
        with gr.Row():
            self.src = gr.Dropdown(choices=queues, value=next(iter(queues), None), label="Queue",
                                   elem_id="queue-source", scale=2, allow_custom_value=True)
            self.order = gr.Radio(list(ORDERS), value="uncertain", label="Order", elem_id="queue-order", scale=2)
            self.seed = gr.Number(value=0, precision=0, label="Seed (random)", elem_id="queue-seed", scale=1)
            self.reviewer = gr.Textbox(label="Reviewer", elem_id="queue-reviewer", scale=1, visible=not signed_in)
            self.start_btn = gr.Button("Review", elem_id="queue-open", scale=1)
        with gr.Row():
            self.root_pick = gr.Dropdown(choices=[], label="Open from the queue root (admin)", elem_id="queue-root",
                                         visible=False, scale=3, allow_custom_value=True)
            self.root_btn = gr.Button("Open", elem_id="queue-root-open", visible=False, scale=1)
        self.progress = gr.Markdown(elem_id="queue-progress")
        with gr.Row():
            with gr.Column(scale=1):
                self.image = gr.Image(type="pil", label="Meme", interactive=False, elem_id="queue-image", height=360)
                self.caption = gr.Textbox(label="Caption (as reviewed; correct it if OCR got it wrong)", lines=3,
                                          elem_id="queue-caption")
            with gr.Column(scale=1):
                self._verdict_controls()
        self.explanation = gr.Markdown(elem_id="queue-explanation")
        with gr.Row():
            self.export_btn = gr.Button("Export reviewed manifest", elem_id="queue-export", visible=not signed_in)
            self.export_file = gr.File(label="reviewed manifest", elem_id="queue-export-file", visible=not signed_in)
        self.export_status = gr.Markdown(elem_id="queue-export-status")

    def _verdict_controls(self):
        self.model_md = gr.Markdown(elem_id="queue-model")
        self.radios = [gr.Radio(list(t.classes), label=t.name + (f" (only when {t.gate} = yes)" if t.gate else ""),
                                elem_id=f"verdict-{t.name}") for t in self.schema.tasks]
        self.note = gr.Textbox(label="Note", elem_id="queue-note")
        with gr.Row():
            self.save_btn = gr.Button("Save verdict & next (s)", variant="primary", elem_id="queue-save")
            self.skip_btn = gr.Button("Skip (k)", elem_id="queue-skip")
        self.status = gr.Markdown(elem_id="queue-status")

    def wire(self, blocks: gr.Blocks, on: QueueHandlers):
        """Every event of the page, with its API name (clients and tests call them by name)."""
        outputs = [self.state, self.image, self.caption, self.model_md, self.explanation, *self.radios,
                   self.progress, self.status]
        picked = [self.src, self.order, self.seed, self.reviewer]
        score = dict(concurrency_limit=4, concurrency_id="queue")  # opening a folder scores it
        self.start_btn.click(on.start, picked, outputs, api_name="queue_start", **score)
        self.reviewer.submit(on.start, picked, outputs, api_name="queue_reviewer", **score)
        self.root_btn.click(on.open_from_root, [self.root_pick, self.order, self.seed, self.reviewer],
                            [self.src, *outputs], api_name="queue_open", **score)
        self.save_btn.click(on.save, [self.state, self.reviewer, self.caption, self.note, *self.radios], outputs,
                            api_name="queue_save").then(lambda: "", None, self.note, api_name="queue_clear_note")
        self.skip_btn.click(on.skip, [self.state, self.reviewer], outputs, api_name="queue_skip")
        self.export_btn.click(on.export, None, [self.export_file, self.export_status], api_name="queue_export")
        if self.schema.name == "harmeme":
            self._link_harmeme_radios()
        blocks.load(on.on_load, [self.order, self.seed, self.reviewer],
                    [self.src, self.root_pick, self.root_btn, self.export_btn, self.export_file, *outputs],
                    api_name="queue_load", **score)

    def _link_harmeme_radios(self):
        """harmful follows harmfulness (HarMeme derives one from the other), and back."""
        by = {t.name: r for t, r in zip(self.schema.tasks, self.radios)}
        by["harmfulness"].input(lambda h: "no" if h == "not harmful" else "yes", by["harmfulness"], by["harmful"],
                                api_name="queue_harmfulness")
        by["harmful"].input(lambda f, h: "not harmful" if f == "no" else
                            (h if h != "not harmful" else "somewhat harmful"),
                            [by["harmful"], by["harmfulness"]], by["harmfulness"], api_name="queue_harmful")
