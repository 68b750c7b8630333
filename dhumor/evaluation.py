"""Evaluate a checkpoint on any labelled manifest (features computed on the fly and cached)."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .data.explanations import attach_explanations
from .data.readers import read_manifest
from .errors import DataError
from .model.metrics import compute_metrics
from .pipeline import Pipeline
from .schema import MISSING

log = logging.getLogger("dhumor")


def evaluate(pipeline: Pipeline, manifest: str | Path, images: str | Path | None = None, format: str = "auto",
             skip_bad: bool = False, explanations: str | Path | None = None,
             explanation_iteration: int = -1) -> tuple[dict, dict]:
    """``(metrics per task, summary)`` of ``pipeline`` on a labelled manifest."""
    res = read_manifest(manifest, format, images, skip_bad)
    if res.schema_name is None:
        raise DataError(manifest, "an image folder has no labels to evaluate against; pass a labelled manifest")
    if res.schema_name != pipeline.schema.name:
        raise DataError(manifest, f"manifest carries {res.schema_name!r} labels; the checkpoint predicts "
                                  f"{pipeline.schema.name!r}")
    memes = res.memes
    if explanations:
        attach_explanations(memes, explanations, explanation_iteration)
    elif "reasoning" in pipeline.streams and pipeline.explainer is not None:
        pipeline.explainer.attach(memes)
    pred = pipeline.predict_memes(memes)
    if pred.errors and not skip_bad:
        first = next(iter(pred.errors.values()))
        raise DataError(first.file, f"{first.reason} ({len(pred.errors)} unusable image(s); pass --skip-bad to skip)")
    kept = [memes[i] for i in pred.kept]
    labels = {t.name: np.array([m.labels.get(t.name, MISSING) for m in kept]) for t in pipeline.schema.tasks}
    metrics = compute_metrics(pipeline.schema, pred.probs, labels)
    summary = {"manifest": str(manifest), "memes": len(memes) + len(res.skipped), "scored": len(kept),
               "skipped_rows": len(res.skipped), "unusable_images": len(pred.errors),
               "features": vars(pipeline.extractor.stats)}
    return metrics, summary


def format_metrics(metrics: dict) -> str:
    """A plain-text table of the headline metrics."""
    lines = [f"{'task':<14}{'n':>6}{'acc':>8}{'macroF1':>9}{'wF1':>8}{'AUROC':>8}"]
    for task, m in metrics.items():
        fmt = lambda k: f"{m[k]:.3f}" if m.get(k) is not None else "-"  # noqa: E731
        lines.append(f"{task:<14}{m.get('n', 0):>6}{fmt('accuracy'):>8}{fmt('macro_f1'):>9}{fmt('weighted_f1'):>8}"
                     f"{fmt('auroc'):>8}")
    return "\n".join(lines)
