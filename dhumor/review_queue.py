"""The review queue: serve scored memes to a moderator in the order where a verdict is worth most.

A queue is a ``dhumor score`` results file (JSONL), or a folder that is scored into one on the way.
Orders: ``uncertain`` (primary-task probability nearest the threshold first), ``flagged`` (flagged
first, most confident first), ``unfamiliar`` (most unlike the training memes first; rows without an
unfamiliarity score last, nearest the threshold first) and ``random`` (a seeded sample, for audits). Verdicts on every task
of the checkpoint's schema go to the :class:`~dhumor.review.ReviewLog` with the reviewer's name, so
progress survives a restart: the queue skips what the reviewer already judged.

>>> rows = [{"id": "a", "decision": {"probability": 0.9, "threshold": 0.5, "flagged": True}},
...         {"id": "b", "decision": {"probability": 0.45, "threshold": 0.5, "flagged": False}}]
>>> [r["id"] for r in order_queue(rows, "uncertain")]
['b', 'a']
"""
from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np

from .results_file import ResultsFile
from .review import ReviewLog
from .reviews_export import check_labels, export_reviews
from .schema import TaskSchema

ORDERS = ("uncertain", "flagged", "unfamiliar", "random")
KEYS_HELP = ("Keys (outside text boxes): **y** / **n** set the primary task, **1**–**9** pick a class of the "
             "next task, **s** saves the verdict and moves on, **k** skips.")


def order_queue(rows: list[dict], order: str = "uncertain", seed: int = 0, threshold: float | None = None) -> list[dict]:
    """Scored rows in review order (rows without a decision, i.e. errors, are left out).

    ``threshold`` overrides the one each row was decided with (for ``uncertain``)."""
    rows = [r for r in rows if r.get("decision") and not r.get("error")]
    if order == "uncertain":
        def dist(r):
            th = threshold if threshold is not None else r["decision"]["threshold"]
            return abs(r["decision"]["probability"] - th)
        return sorted(rows, key=lambda r: (dist(r), r["id"]))
    if order == "unfamiliar":
        def unfamiliarity(r):
            th = threshold if threshold is not None else r["decision"]["threshold"]
            ood = r.get("ood")
            return (ood is None, -(ood or {}).get("score", 0.0), abs(r["decision"]["probability"] - th), r["id"])
        return sorted(rows, key=unfamiliarity)
    if order == "flagged":
        return sorted(rows, key=lambda r: (not r["decision"]["flagged"], -r["decision"]["probability"], r["id"]))
    if order == "random":
        rows = sorted(rows, key=lambda r: r["id"])  # the permutation must not depend on file order
        return [rows[i] for i in np.random.default_rng(seed).permutation(len(rows))]
    raise ValueError(f"unknown queue order {order!r}; one of {list(ORDERS)}")


def queue_file_for(folder: Path, review_log: ReviewLog) -> Path:
    """Where a folder's scores live: beside the review log, named by the folder's absolute path."""
    base = Path(tempfile.gettempdir()) if review_log.path == ":memory:" else Path(review_log.path).parent
    key = hashlib.sha1(str(folder.resolve()).encode()).hexdigest()[:10]
    return base / "queues" / f"{folder.name}-{key}.jsonl"


def load_queue_rows(source: str | Path, pipe=None, review_log: ReviewLog | None = None,
                    progress: bool = False) -> tuple[Path, list[dict]]:
    """``(results file, rows)`` of a results JSONL, or of a folder scored (resumably) with ``pipe``."""
    source = Path(source)
    if source.is_dir():
        if pipe is None or review_log is None:
            raise ValueError(f"{source}: scoring a folder needs a checkpoint")
        from .scoring import Scorer, collect_items

        out = queue_file_for(source, review_log)
        Scorer(pipe, ResultsFile(out, pipe.schema), progress=progress).run(collect_items(source))
        source = out
    if not source.is_file():
        raise ValueError(f"{source}: no such results file or folder")
    if source.suffix.lower() != ".jsonl":
        raise ValueError(f"{source}: the queue reads a JSONL results file of `dhumor score` (use --out x.jsonl)")
    rows = ResultsFile(source, None).rows()
    if rows and "decision" not in rows[0]:
        raise ValueError(f"{source}: not a dhumor results file (rows have no decision)")
    return source.resolve(), rows


class ReviewQueue:
    """One results file in one order, and the reviewers' progress through it (from the review log)."""

    def __init__(self, rows: list[dict], source: str | Path, log: ReviewLog, schema: TaskSchema,
                 order: str = "uncertain", seed: int = 0, threshold: float | None = None):
        missing = [r["id"] for r in rows if r.get("tasks") and set(r["tasks"]) != set(schema.task_names)]
        if missing:
            raise ValueError(f"{source}: rows score other tasks than {schema.task_names} (e.g. {missing[0]!r}); "
                             f"open the queue with the checkpoint that scored it")
        self.rows = order_queue(rows, order, seed, threshold)
        self.by_id = {r["id"]: r for r in self.rows}
        self.source, self.log, self.schema = str(source), log, schema

    def progress(self, reviewer: str) -> tuple[int, int]:
        """``(reviewed by reviewer, total)``."""
        done = self.log.reviewed_shas(reviewer)
        return sum(r["sha256"] in done for r in self.rows), len(self.rows)

    def next_item(self, reviewer: str, skipped: set[str] = frozenset()) -> dict | None:
        done = self.log.reviewed_shas(reviewer)
        return next((r for r in self.rows if r["sha256"] not in done and r["id"] not in skipped), None)

    def record(self, row: dict, labels: dict, reviewer: str, note: str = "", caption: str | None = None,
               checkpoint: str | None = None) -> int:
        """Validate and store a verdict on every task; returns the review id."""
        if not reviewer.strip():
            raise ValueError("enter your name as reviewer first (verdicts carry it)")
        labels = check_labels(self.schema, labels)
        prim = self.schema.task(self.schema.primary)
        dec = row["decision"]
        final = labels[prim.name] == prim.classes[1]
        out = {k: row.get(k) for k in ("tasks", "decision", "caption", "explanation")}
        return self.log.record(sha256=row["sha256"], filename=Path(row["path"]).name, model_output=out,
                               model_flagged=bool(dec["flagged"]),
                               verdict="confirm" if final == bool(dec["flagged"]) else
                               ("override: flag" if final else "override: do not flag"),
                               note=note, moderator=reviewer.strip(), checkpoint=checkpoint,
                               threshold=dec["threshold"], labels=labels, queue=self.source, item_id=row["id"],
                               path=row["path"], caption=row.get("caption") if caption is None else caption)


def default_labels(schema: TaskSchema, row: dict) -> dict[str, str]:
    """The model's answer as a starting verdict: each task's label, or its most probable class when gated off."""
    out = {}
    for t in schema.tasks:
        tr = row["tasks"][t.name]
        out[t.name] = tr["label"] or max(tr["probs"], key=tr["probs"].get)
    return out


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


def build_queue_tab(pipe, review_log: ReviewLog, source: str | None = None, models=None):
    """The review queue page (a ``gr.Blocks``); the demo shows it as its second tab. ``models``: the
    demo's :class:`~dhumor.model_thread.ModelThread`, on which a folder given as queue is scored."""
    import gradio as gr

    from .demo import explanation_markdown
    from .images import load_image

    schema = pipe.schema
    cache: dict[tuple, ReviewQueue] = {}

    def get_queue(src: str, order: str, seed: float) -> ReviewQueue:
        key = (src, order, int(seed))
        if key not in cache:
            load = models.call if models is not None else (lambda f, *a: f(*a))
            path, rows = load(load_queue_rows, src, pipe, review_log)
            cache[key] = ReviewQueue(rows, path, review_log, schema, order, int(seed))
        return cache[key]

    n_out = 7 + len(schema.tasks)  # len(outputs) below

    def show(state: dict, reviewer: str, status: str = ""):
        blank = [state, None, "", "", "", *[gr.update(value=None) for _ in schema.tasks], "", status]
        if not state.get("source"):
            blank[-2] = "Open a results file (`dhumor score ... --out x.jsonl`) or a folder of memes."
            return blank
        try:
            q = get_queue(state["source"], state["order"], state["seed"])
        except ValueError as e:
            blank[-1] = f"**Cannot open the queue:** {e}"
            return blank
        done, total = q.progress(reviewer.strip())
        prog = f"**{done} of {total} reviewed** by {reviewer.strip() or '(enter your name)'} · order: {state['order']}"
        unfamiliar = sum(bool((r.get("ood") or {}).get("unfamiliar")) for r in q.rows)
        if any(r.get("ood") for r in q.rows):
            prog += f" · {unfamiliar} unfamiliar ({unfamiliar / max(1, total):.0%})"
        row = q.next_item(reviewer.strip(), set(state.get("skipped", [])))
        state = {**state, "current": row["id"] if row else None}
        if row is None:
            return [state, None, "", "*Nothing left to review in this order.*", "",
                    *[gr.update(value=None) for _ in schema.tasks], prog, status]
        try:
            img = load_image(row["path"])
        except Exception as e:  # the file moved or broke since scoring: say so, keep the verdict controls
            img, status = None, f"{status} **Cannot show {row['path']}:** {e}"
        defaults = default_labels(schema, row)
        return [state, img, row.get("caption") or "", model_markdown(schema, row),
                explanation_markdown(row, row.get("explanation_trail") is not None, "reasoning" in pipe.streams),
                *[gr.update(value=defaults[t.name]) for t in schema.tasks], prog + f" · now: `{row['id']}`", status]

    def open_queue(src, order, seed, reviewer):
        return show({"source": (src or "").strip(), "order": order, "seed": int(seed or 0), "skipped": []}, reviewer)

    def save(state, reviewer, caption, note, *labels):
        q_row = None
        if state.get("current"):
            q = get_queue(state["source"], state["order"], state["seed"])
            q_row = q.by_id.get(state["current"])
        if q_row is None:
            return show(state, reviewer, "Open a queue first.")
        try:
            rid = q.record(q_row, dict(zip(schema.task_names, labels)), reviewer, note=note, caption=caption,
                           checkpoint=pipe.checkpoint)
        except ValueError as e:
            out = show(state, reviewer, f"**Not recorded:** {e}")
            return out[:1] + [gr.update()] * (n_out - 2) + out[-2:]  # keep the meme and the edits on the page
        return show(state, reviewer, f"Recorded review #{rid} for `{q_row['id']}`.")

    def skip(state, reviewer):
        if state.get("current"):
            state = {**state, "skipped": [*state.get("skipped", []), state["current"]]}
        return show(state, reviewer, "Skipped.")

    def export():
        out = Path(tempfile.mkdtemp(prefix="dhumor-reviewed-")) / ("reviewed.jsonl" if schema.name != "dhumor"
                                                                    else "reviewed.csv")
        try:
            rep = export_reviews(review_log, out, schema=schema)
        except ValueError as e:
            return None, f"**Export failed:** {e}"
        return str(out), (f"Exported {rep.written} memes; {len(rep.conflicts)} conflicts left out; "
                          f"{len(rep.skipped)} unusable.")

    with gr.Blocks(title="dhumor — review queue") as page:
        gr.Markdown(f"## Review queue\n{KEYS_HELP}")
        state = gr.State({})
        with gr.Row():
            src = gr.Textbox(value=source or "", label="Results file (.jsonl) or folder", elem_id="queue-source", scale=3)
            order = gr.Radio(list(ORDERS), value="uncertain", label="Order", elem_id="queue-order", scale=2)
            seed = gr.Number(value=0, precision=0, label="Seed (random)", elem_id="queue-seed", scale=1)
            reviewer = gr.Textbox(label="Reviewer", elem_id="queue-reviewer", scale=1)
            open_btn = gr.Button("Open", elem_id="queue-open", scale=1)
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
            export_btn = gr.Button("Export reviewed manifest", elem_id="queue-export")
            export_file = gr.File(label="reviewed manifest", elem_id="queue-export-file")
        export_status = gr.Markdown(elem_id="queue-export-status")

        outputs = [state, image, caption, model_md, explanation, *radios, progress, status]
        open_btn.click(open_queue, [src, order, seed, reviewer], outputs)
        reviewer.submit(open_queue, [src, order, seed, reviewer], outputs)
        save_btn.click(save, [state, reviewer, caption, note, *radios], outputs).then(lambda: "", None, note)
        skip_btn.click(skip, [state, reviewer], outputs)
        export_btn.click(export, None, [export_file, export_status])
        if schema.name == "harmeme":  # harmful follows harmfulness (HarMeme derives one from the other)
            by = {t.name: r for t, r in zip(schema.tasks, radios)}
            by["harmfulness"].input(lambda h: "no" if h == "not harmful" else "yes", by["harmfulness"], by["harmful"])
            by["harmful"].input(lambda f, h: "not harmful" if f == "no" else
                                (h if h != "not harmful" else "somewhat harmful"),
                                [by["harmful"], by["harmfulness"]], by["harmfulness"])
        page.load(open_queue, [src, order, seed, reviewer], outputs)
        page.load(None, None, None, js=_keyboard_js(schema))
    return page
