"""Batch scoring of meme folders and manifests: resumable, exactly once, every bad file reported.

For each image: decode → OCR (or the manifest's caption) → explanation (optional) → features →
TCRNet → one row. Rows are appended in batches (whole lines, fsynced); a rerun with the same
output skips every id already written, so a run killed at any moment (SIGKILL included) resumes
where it stopped with no row lost or duplicated.
"""
from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from .data.readers import iter_image_files, read_manifest
from .errors import DataError
from .images import load_image_with_digest
from .items import Item  # defined in dhumor.items; still importable from here
from .pipeline import Pipeline
from .results_file import ResultsFile

log = logging.getLogger("dhumor")


@dataclass
class ScoreSummary:
    total: int = 0
    already_done: int = 0
    scored: int = 0
    failed: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    cache_hits: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)  # per task: class -> count over the whole output
    errors: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict:
        d = dict(vars(self))
        d["errors"] = dict(self.errors)
        return d


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``"i/n"`` (0-based i) → (i, n)."""
    if not spec:
        return 0, 1
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise ValueError(f"--shard takes i/n with 0 <= i < n, got {spec!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard takes i/n with 0 <= i < n, got {spec!r}")
    return i, n


def in_shard(item_id: str, shard: tuple[int, int]) -> bool:
    """Deterministic by id alone, so every machine agrees whatever order it lists files in."""
    i, n = shard
    return n == 1 or int(hashlib.sha1(item_id.encode()).hexdigest(), 16) % n == i


def collect_items(source: str | Path, format: str = "auto", images: str | Path | None = None) -> list[Item]:
    """Items of a folder (walked recursively; id = relative path) or a manifest (id = its id)."""
    source = Path(source)
    if source.is_dir():
        return [Item(p.relative_to(source).as_posix(), p) for p in iter_image_files(source)]
    res = read_manifest(source, format, images, skip_bad=True)
    items = [Item(m.id, m.image, m.caption) for m in res.memes]
    for e in res.skipped:  # rows that name no usable image still get a row each, with the reason
        items.append(Item(f"{Path(e.file).name}:{e.row}", Path(e.file), error=e.reason))
    return items


class Scorer:
    """Scores items with a :class:`Pipeline` into a :class:`ResultsFile`."""

    def __init__(self, pipeline: Pipeline, results: ResultsFile, batch_size: int = 16, workers: int = 2,
                 caption_from_manifest: bool = False, progress: bool = True):
        self.pipe, self.results = pipeline, results
        self.batch_size, self.workers = max(1, batch_size), max(1, workers)
        self.caption_from_manifest = caption_from_manifest
        self.progress = progress

    def _error_row(self, item: Item, reason: str, sha: str | None = None, timings: dict | None = None) -> dict:
        return {"id": item.id, "path": str(item.path), "sha256": sha, "caption": None, "caption_source": None,
                "tasks": None, "decision": None, "explanation": None, "explanation_trail": None, "error": reason,
                "timings": timings or {}}

    def _prepare(self, item: Item):
        """Decode and OCR one item (runs in a worker thread)."""
        if item.error:
            return item, None, None, None, {}, item.error
        timings = {}
        t = time.perf_counter()
        try:
            img, sha = load_image_with_digest(item.path)
        except DataError as e:
            return item, None, None, None, {"decode": time.perf_counter() - t}, e.reason
        timings["decode"] = time.perf_counter() - t
        caption, source = None, None
        if self.caption_from_manifest and item.caption is not None:
            caption, source = item.caption, "manifest"
        elif self.pipe.ocr is not None:
            t = time.perf_counter()
            try:
                caption, source = self.pipe.ocr.read(img, sha), self.pipe.ocr.engine
            except Exception as e:  # an engine failure on one image must not stop the batch
                return item, None, sha, None, timings, f"OCR failed: {type(e).__name__}: {e}"
            timings["ocr"] = time.perf_counter() - t
        return item, img, sha, (caption, source), timings, None

    def _score_batch(self, prepared: list) -> list[dict]:
        pipe = self.pipe
        rows: list[dict | None] = [None] * len(prepared)
        ok = []
        for j, (item, img, sha, cap, timings, err) in enumerate(prepared):
            if err is not None:
                rows[j] = self._error_row(item, err, sha, timings)
            else:
                ok.append(j)
        explanations: dict[int, tuple] = {}
        if pipe.explainer is not None:  # written to the row always; fed to the model if it has a reasoning stream
            for j in ok:
                item, img, sha, cap, timings, _ = prepared[j]
                t = time.perf_counter()
                res = pipe.explainer.explain(img, sha, cap[0] or "")
                timings["explain"] = time.perf_counter() - t
                explanations[j] = (res.text if res.ok else None, res.to_dict())
        if ok:
            t = time.perf_counter()
            feats = [{} for _ in ok]
            if "image" in pipe.streams:
                for f, v in zip(feats, pipe.extractor.image_features_from_pil([prepared[j][1] for j in ok],
                                                                                [prepared[j][2] for j in ok])):
                    f["image"] = v
            if "caption" in pipe.streams:
                for f, v in zip(feats, pipe.extractor.text_features("caption", [prepared[j][3][0] for j in ok])):
                    f["caption"] = v
            if "reasoning" in pipe.streams:
                texts = [explanations.get(j, (None, None))[0] for j in ok]
                for f, v in zip(feats, pipe.extractor.text_features("reasoning", texts)):
                    f["reasoning"] = v
            t_feat = (time.perf_counter() - t) / len(ok)
            t = time.perf_counter()
            probs = pipe.predict_features(feats)
            t_model = (time.perf_counter() - t) / len(ok)
            for k, j in enumerate(ok):
                item, img, sha, (caption, source), timings, _ = prepared[j]
                timings.update(features=t_feat, model=t_model)  # batch time shared out per meme
                text, trail = explanations.get(j, (None, None))
                row = {"id": item.id, "path": str(item.path), "sha256": sha, "caption": caption,
                       "caption_source": source, **pipe.describe({t_: v[k] for t_, v in probs.items()}),
                       "explanation": text, "explanation_trail": trail, "error": None}
                row["timings"] = {s: round(v, 4) for s, v in timings.items()}
                rows[j] = row
        return rows  # type: ignore[return-value]

    def run(self, items: Sequence[Item], retry_errors: bool = False) -> ScoreSummary:
        summary = ScoreSummary(total=len(items))
        t0 = time.perf_counter()
        self.results.repair()
        done = self.results.done_ids()
        if retry_errors:
            failed = {i for i, err in done.items() if err}
            if failed:
                self.results.drop_ids(failed)
                done = {i: e for i, e in done.items() if i not in failed}
        todo = [it for it in items if it.id not in done]
        summary.already_done = len(items) - len(todo)
        stats0 = dict(vars(self.pipe.extractor.stats))
        bar = tqdm(total=len(todo), desc="scoring", unit="meme", disable=not self.progress or not todo)
        try:
            with ThreadPoolExecutor(self.workers) as pool:
                for b in range(0, len(todo), self.batch_size):
                    batch = todo[b:b + self.batch_size]
                    rows = self._score_batch(list(pool.map(self._prepare, batch)))
                    self.results.append(rows)
                    for r in rows:
                        if r["error"]:
                            summary.failed += 1
                            summary.errors[r["error"].split(":")[0]] += 1
                        else:
                            summary.scored += 1
                    bar.update(len(batch))
        except KeyboardInterrupt:
            summary.interrupted = True  # rows written so far are complete; a rerun continues
        finally:
            bar.close()
        summary.seconds = round(time.perf_counter() - t0, 2)
        st = vars(self.pipe.extractor.stats)
        summary.cache_hits = {"features": st["cached"] - stats0["cached"], "computed": st["computed"] - stats0["computed"]}
        summary.labels = self.label_counts()
        return summary

    def label_counts(self) -> dict:
        counts: dict[str, Counter] = {t.name: Counter() for t in self.pipe.schema.tasks}
        for r in self.results.rows():
            if r.get("error"):
                continue
            for t in self.pipe.schema.tasks:
                label = (r["tasks"][t.name]["label"] if not self.results.csv else r.get(f"{t.name}_label")) or None
                if label:
                    counts[t.name][label] += 1
        return {k: dict(v) for k, v in counts.items()}
