"""Evaluate a checkpoint on any labelled manifest, through the same pipeline that scores memes."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from dhumor.data.explanations import attach_explanations
from dhumor.data.readers import read_manifest
from dhumor.util.files import atomic_write
from dhumor.errors import DataError
from dhumor.inference.items import Item
from dhumor.model.metrics import compute_metrics
from dhumor.inference.pipeline import Pipeline
from dhumor.schema import MISSING

log = logging.getLogger("dhumor")


def evaluate(pipeline: Pipeline, manifest: str | Path, images: str | Path | None = None, format: str = "auto",
             skip_bad: bool = False, explanations: str | Path | None = None, explanation_iteration: int = -1,
             predictions: str | Path | None = None, batch_size: int = 64) -> tuple[dict, dict]:
    """``(metrics per task, summary)`` of ``pipeline`` on a labelled manifest.

    Captions come from the manifest unless the pipeline has OCR; explanations from ``explanations``
    (a ``dhumor explain`` JSONL) or the pipeline's explainer. ``predictions`` also writes each meme's
    result row (the rows ``dhumor score`` writes) to a JSONL file, atomically.
    """
    res = read_manifest(manifest, format, images, skip_bad)
    if res.schema_name is None:
        raise DataError(manifest, "an image folder has no labels to evaluate against; pass a labelled manifest")
    if res.schema_name != pipeline.schema.name:
        raise DataError(manifest, f"manifest carries {res.schema_name!r} labels; the checkpoint predicts "
                                  f"{pipeline.schema.name!r}")
    memes = res.memes
    if explanations:
        attach_explanations(memes, explanations, explanation_iteration)
    use_ocr = pipeline.ocr is not None
    items = [Item(m.id, m.image, None if use_ocr else (m.caption or ""), m.explanation, labels=dict(m.labels))
             for m in memes]
    rows = [r for batch in pipeline.run(items, batch_size=batch_size) for r in batch]
    bad = [r for r in rows if r["error"]]
    if bad and not skip_bad:
        raise DataError(bad[0]["path"], f"{bad[0]['error']} ({len(bad)} unusable image(s); pass --skip-bad to skip)")
    kept = [(it, r) for it, r in zip(items, rows) if not r["error"]]
    schema = pipeline.schema
    probs = {t.name: np.array([[r["tasks"][t.name]["probs"][c] for c in t.classes] for _, r in kept]).reshape(-1, t.num_classes)
             for t in schema.tasks}
    labels = {t.name: np.array([it.labels.get(t.name, MISSING) for it, _ in kept]) for t in schema.tasks}
    metrics = compute_metrics(schema, probs, labels)
    _add_decision_metrics(metrics, schema.primary, kept, labels[schema.primary], pipeline.decider.threshold)
    if predictions:
        _write_rows(predictions, rows)
    summary = {"manifest": str(manifest), "memes": len(memes) + len(res.skipped), "scored": len(kept),
               "skipped_rows": len(res.skipped), "unusable_images": len(bad),
               "threshold": pipeline.decider.threshold, "features": vars(pipeline.extractor.stats)}
    from dhumor.inference.scoring import ScoreSummary, tally

    counted = ScoreSummary()
    tally((r for _, r in kept), schema, False, counted)
    summary.update(unfamiliar=counted.unfamiliar, unfamiliar_share=counted.unfamiliar_share, abstained=counted.abstained)
    return metrics, summary


def _add_decision_metrics(metrics: dict, primary: str, kept: list, y: np.ndarray, threshold: float) -> None:
    """The primary task's metrics at the decision threshold in use (the others are threshold-free: argmax)."""
    from sklearn.metrics import accuracy_score, f1_score

    mask = y >= 0
    if primary not in metrics or not mask.any():
        return
    flagged = np.array([int(r["decision"]["flagged"]) for _, r in kept])
    metrics[primary]["at_threshold"] = {
        "threshold": threshold, "accuracy": float(accuracy_score(y[mask], flagged[mask])),
        "macro_f1": float(f1_score(y[mask], flagged[mask], average="macro", zero_division=0))}


def _write_rows(path: str | Path, rows: list[dict]) -> None:
    atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def format_metrics(metrics: dict) -> str:
    """A plain-text table of the headline metrics."""
    lines = [f"{'task':<14}{'n':>6}{'acc':>8}{'macroF1':>9}{'wF1':>8}{'AUROC':>8}"]
    for task, m in metrics.items():
        fmt = lambda k: f"{m[k]:.3f}" if m.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{task:<14}{m.get('n', 0):>6}{fmt('accuracy'):>8}{fmt('macro_f1'):>9}{fmt('weighted_f1'):>8}"
                     f"{fmt('auroc'):>8}")
    return "\n".join(lines)
