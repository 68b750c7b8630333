"""The review queue's page: the demo's second tab over a :class:`~dhumor.review.queue.ReviewQueue`."""
from __future__ import annotations

import tempfile
from pathlib import Path

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
    import threading

    import gradio as gr

    from dhumor.app.access import Access, Forbidden, with_request
    from dhumor.app.text import md
    from dhumor.app.render import explanation_markdown
    from dhumor.images import load_image

    schema = pipe.schema
    access = access or Access(None)
    if run_pipe is None:
        from dhumor.app.model_calls import pipeline_on

        run_pipe = pipeline_on(models, pipe) if models is not None else pipe
    root = Path(queue_root).resolve() if queue_root else None
    cache: dict[tuple, ReviewQueue] = {}
    loading = threading.Lock()  # one queue scored at a time; a second request for it waits, then reuses it
    opened: dict[str, Path] = {}  # name -> source, shared by every session (an admin opens, reviewers review)
    if source:
        opened[Path(source).name] = Path(source)

    def get_queue(name: str, order: str, seed: float) -> ReviewQueue:
        if name not in opened:
            raise ValueError(f"no open queue named {name!r}" if name else "no queue is open yet")
        key = (name, order, int(seed))
        with loading:
            if key not in cache:
                path, rows = load_queue_rows(opened[name], run_pipe, review_log)
                cache[key] = ReviewQueue(rows, path, review_log, schema, order, int(seed))
        return cache[key]

    def image_of(row: dict):
        path = Path(row["path"])
        if root is not None and opened and not path.resolve().is_relative_to(root) and \
                not any(path.resolve().is_relative_to(Path(s).resolve().parent) for s in ([source] if source else [])):
            raise ValueError("the image is outside the queue root; not shown")
        return load_image(path)

    n_out = 7 + len(schema.tasks)  # len(outputs) below

    def show(state: dict, reviewer: str, status: str = ""):
        blank = [state, None, "", "", "", *[gr.update(value=None) for _ in schema.tasks], "", status]
        if not state.get("source"):
            blank[-2] = ("Pick a queue." if opened else
                         "No queue is open yet" + (": an admin opens one from the queue root." if root else "."))
            return blank
        try:
            q = get_queue(state["source"], state["order"], state["seed"])
        except ValueError as e:
            blank[-1] = f"**Cannot open the queue:** {md(e)}"
            return blank
        done, total = q.progress(reviewer)
        prog = (f"**{done} of {total} reviewed** by {md(reviewer) or '(enter your name)'} · queue: "
                f"{md(state['source'])} · order: {md(state['order'])}")
        unfamiliar = sum(bool((r.get("ood") or {}).get("unfamiliar")) for r in q.rows)
        if any(r.get("ood") for r in q.rows):
            prog += f" · {unfamiliar} unfamiliar ({unfamiliar / max(1, total):.0%})"
        row = q.next_item(reviewer, set(state.get("skipped", [])))
        state = {**state, "current": row["id"] if row else None}
        if row is None:
            return [state, None, "", "*Nothing left to review in this order.*", "",
                    *[gr.update(value=None) for _ in schema.tasks], prog, status]
        try:
            img = image_of(row)
        except Exception as e:  # the file moved or broke since scoring: say so, keep the verdict controls
            img, status = None, f"{status} **Cannot show {md(Path(row['path']).name)}:** {md(e)}"
        defaults = default_labels(schema, row)
        return [state, img, row.get("caption") or "", model_markdown(schema, row),
                explanation_markdown(row, row.get("explanation_trail") is not None, "reasoning" in pipe.streams),
                *[gr.update(value=defaults[t.name]) for t in schema.tasks], prog + f" · now: {md(row['id'])}", status]


    @with_request
    def start(name, order, seed, reviewer, request):
        """Review queue ``name`` (one already open) in ``order``."""
        if not access.may(request, "review"):
            return show({}, "", "**Sign in to review.**")
        order = order if order in ORDERS else "uncertain"
        return show({"source": name if name in opened else "", "order": order, "seed": int(seed or 0),
                     "skipped": []}, access.reviewer(request, reviewer))


    @with_request
    def open_from_root(entry, order, seed, reviewer, request):
        """An admin opens an entry of the queue root (chosen from the list; anything else is refused)."""
        try:
            access.require(request, "open_queue")
            found = queue_candidates(root)
            if entry not in found:
                raise ValueError(f"{entry!r} is not in the queue root's list")
        except (Forbidden, ValueError) as e:
            return [gr.update(), *show({}, access.reviewer(request, reviewer), f"**Not opened:** {md(e)}")]
        opened[entry] = found[entry]
        out = show({"source": entry, "order": order if order in ORDERS else "uncertain", "seed": int(seed or 0),
                    "skipped": []}, access.reviewer(request, reviewer))
        return [gr.update(choices=list(opened), value=entry), *out]


    @with_request
    def save(request, state, reviewer, caption, note, *labels):  # the request first: labels vary
        reviewer = access.reviewer(request, reviewer)
        if not access.may(request, "review"):
            return show({}, "", "**Sign in to review.**")
        q_row = None
        if state.get("current") and state.get("source") in opened:
            q = get_queue(state["source"], state["order"], state["seed"])
            q_row = q.by_id.get(state["current"])
        if q_row is None:
            return show(state, reviewer, "Open a queue first.")
        dec = q_row["decision"]
        seen = {"probability": dec["probability"], "threshold": dec["threshold"], "preset": q_row.get("preset"),
                "flagged": dec["flagged"], "order": state["order"]}
        try:
            rid = q.record(q_row, dict(zip(schema.task_names, labels)), reviewer, note=note, caption=caption,
                           checkpoint=pipe.checkpoint, checkpoint_digest=pipe.checkpoint_digest,
                           seen=seen, signed_in=access.signed_in)
        except ValueError as e:
            out = show(state, reviewer, f"**Not recorded:** {md(e)}")
            return out[:1] + [gr.update()] * (n_out - 2) + out[-2:]  # keep the meme and the edits on the page
        return show(state, reviewer, f"Recorded review #{rid} for {md(q_row['id'])}.")


    @with_request
    def skip(state, reviewer, request):
        if state.get("current"):
            state = {**state, "skipped": [*state.get("skipped", []), state["current"]]}
        return show(state, access.reviewer(request, reviewer), "Skipped.")

    page_exports = None
    if exports_dir is None:  # a page of its own: its folder lives (and is removed) with the page
        page_exports = tempfile.TemporaryDirectory(prefix="dhumor-reviewed-")
        exports_dir = page_exports.name
    exports = Path(exports_dir)


    @with_request
    def export(request):
        try:
            access.require(request, "export")
        except Forbidden as e:
            return None, f"**Not allowed:** {md(e)}"
        # One file per user, replaced by each export (Gradio serves its own copy, which it expires).
        out = exports / (f"reviewed-{access.user(request) or 'local'}" + (".jsonl" if schema.name != "dhumor" else ".csv"))
        try:
            rep = export_reviews(review_log, out, schema=schema)
        except ValueError as e:
            return None, f"**Export failed:** {md(e)}"
        return str(out), (f"Exported {rep.written} memes; {len(rep.conflicts)} conflicts left out; "
                          f"{len(rep.skipped)} unusable.")


    @with_request
    def on_load(order, seed, reviewer, request):
        admin = access.may(request, "open_queue") and root is not None
        first = next(iter(opened), "")
        pick = gr.update(choices=list(opened), value=first)
        roots = gr.update(choices=list(queue_candidates(root)), visible=admin)
        show_export = access.may(request, "export")
        return [pick, roots, gr.update(visible=admin), gr.update(visible=show_export), gr.update(visible=show_export),
                *start(first, order, seed, reviewer, request)]

    with gr.Blocks(title="dhumor — review queue") as page:
        gr.Markdown(f"## Review queue\n{KEYS_HELP}")
        state = gr.State({})
        with gr.Row():
            src = gr.Dropdown(choices=list(opened), value=next(iter(opened), None), label="Queue",
                              elem_id="queue-source", scale=2, allow_custom_value=True)
            order = gr.Radio(list(ORDERS), value="uncertain", label="Order", elem_id="queue-order", scale=2)
            seed = gr.Number(value=0, precision=0, label="Seed (random)", elem_id="queue-seed", scale=1)
            reviewer = gr.Textbox(label="Reviewer", elem_id="queue-reviewer", scale=1, visible=not access.signed_in)
            start_btn = gr.Button("Review", elem_id="queue-open", scale=1)
        with gr.Row():
            root_pick = gr.Dropdown(choices=[], label="Open from the queue root (admin)", elem_id="queue-root",
                                    visible=False, scale=3, allow_custom_value=True)
            root_btn = gr.Button("Open", elem_id="queue-root-open", visible=False, scale=1)
        progress = gr.Markdown(elem_id="queue-progress")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="pil", label="Meme", interactive=False, elem_id="queue-image", height=360)
                caption = gr.Textbox(label="Caption (as reviewed; correct it if OCR got it wrong)", lines=3,
                                     elem_id="queue-caption")
            with gr.Column(scale=1):
                model_md = gr.Markdown(elem_id="queue-model")
                radios = [gr.Radio(list(t.classes), label=t.name + (f" (only when {t.gate} = yes)" if t.gate else ""),
                                   elem_id=f"verdict-{t.name}") for t in schema.tasks]
                note = gr.Textbox(label="Note", elem_id="queue-note")
                with gr.Row():
                    save_btn = gr.Button("Save verdict & next (s)", variant="primary", elem_id="queue-save")
                    skip_btn = gr.Button("Skip (k)", elem_id="queue-skip")
                status = gr.Markdown(elem_id="queue-status")
        explanation = gr.Markdown(elem_id="queue-explanation")
        with gr.Row():
            export_btn = gr.Button("Export reviewed manifest", elem_id="queue-export", visible=not access.signed_in)
            export_file = gr.File(label="reviewed manifest", elem_id="queue-export-file", visible=not access.signed_in)
        export_status = gr.Markdown(elem_id="queue-export-status")

        outputs = [state, image, caption, model_md, explanation, *radios, progress, status]
        score = dict(concurrency_limit=4, concurrency_id="queue")  # opening a folder scores it
        start_btn.click(start, [src, order, seed, reviewer], outputs, api_name="queue_start", **score)
        reviewer.submit(start, [src, order, seed, reviewer], outputs, api_name="queue_reviewer", **score)
        root_btn.click(open_from_root, [root_pick, order, seed, reviewer], [src, *outputs], api_name="queue_open",
                       **score)
        save_btn.click(save, [state, reviewer, caption, note, *radios], outputs, api_name="queue_save").then(
            lambda: "", None, note, api_name="queue_clear_note")
        skip_btn.click(skip, [state, reviewer], outputs, api_name="queue_skip")
        export_btn.click(export, None, [export_file, export_status], api_name="queue_export")
        if schema.name == "harmeme":  # harmful follows harmfulness (HarMeme derives one from the other)
            by = {t.name: r for t, r in zip(schema.tasks, radios)}
            by["harmfulness"].input(lambda h: "no" if h == "not harmful" else "yes", by["harmfulness"], by["harmful"],
                                    api_name="queue_harmfulness")
            by["harmful"].input(lambda f, h: "not harmful" if f == "no" else
                                (h if h != "not harmful" else "somewhat harmful"),
                                [by["harmful"], by["harmfulness"]], by["harmfulness"], api_name="queue_harmful")
        page.load(on_load, [order, seed, reviewer], [src, root_pick, root_btn, export_btn, export_file, *outputs],
                  api_name="queue_load", **score)
        page.load(None, None, None, js=_keyboard_js(schema))
    if page_exports is not None:
        page._dhumor_exports = page_exports
    return page
