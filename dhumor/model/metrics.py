"""Per-task metrics over masked labels: accuracy, macro-F1, weighted-F1, AUROC (binary), confusion matrix."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, roc_auc_score

from dhumor.schema import MISSING, TaskSchema


def task_metrics(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Metrics for one task; rows labelled MISSING are left out (``n`` counts the rest)."""
    keep = labels != MISSING
    y, p = labels[keep].astype(int), probs[keep]
    out: dict = {"n": int(keep.sum())}
    if out["n"] == 0:
        return out
    pred = p.argmax(1)
    classes = list(range(num_classes))
    out["accuracy"] = float(accuracy_score(y, pred))
    out["macro_f1"] = float(f1_score(y, pred, labels=classes, average="macro", zero_division=0))
    out["weighted_f1"] = float(f1_score(y, pred, labels=classes, average="weighted", zero_division=0))
    if num_classes == 2:
        out["auroc"] = float(roc_auc_score(y, p[:, 1])) if len(np.unique(y)) == 2 else None
    out["confusion_matrix"] = confusion_matrix(y, pred, labels=classes).tolist()
    out["per_class_f1"] = [float(v) for v in f1_score(y, pred, labels=classes, average=None, zero_division=0)]
    out["support"] = np.bincount(y, minlength=num_classes).tolist()
    return out


def compute_metrics(schema: TaskSchema, probs: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """``{task: metrics}`` for every task of the schema that has predictions."""
    return {t.name: task_metrics(np.asarray(probs[t.name]), np.asarray(labels[t.name]), t.num_classes)
            for t in schema.tasks if t.name in probs}


def mean_macro_f1(metrics: dict) -> float:
    """The model-selection score: mean macro-F1 over tasks that have labelled rows."""
    vals = [m["macro_f1"] for m in metrics.values() if m.get("n")]
    return float(np.mean(vals)) if vals else 0.0
