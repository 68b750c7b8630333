"""What ``fit`` learns after training, on the split it selects on: a temperature per task (so that
probabilities mean what they say) and decision-threshold presets for the primary task.

Temperature scaling (Guo et al. 2017): one scalar ``T`` per task, probabilities ``softmax(logits / T)``,
``T`` chosen to minimise the negative log-likelihood of the held-out labels. It changes no argmax.
Presets are thresholds on the calibrated P(positive) of a binary primary task:

- ``high recall``: the highest threshold that still finds 90% of the positives;
- ``balanced``: the threshold of best macro-F1;
- ``high precision``: the lowest threshold whose flagged memes are 80% positive (the most precise
  threshold when 80% is never reached).

>>> import numpy as np
>>> logits = np.array([[0.0, 4.0], [0.0, -4.0], [0.0, 4.0], [0.0, -4.0]]); y = np.array([1, 0, 0, 1])
>>> fit_temperature(logits, y) > 1     # confident and half wrong: softened
True
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.metrics import f1_score, precision_score, recall_score

from dhumor.schema import MISSING

# Temperatures outside this range mean a degenerate held-out split, not a real calibration.
T_MIN, T_MAX = 0.05, 20.0
GRID = np.round(np.arange(0.05, 0.96, 0.01), 2)
RECALL_TARGET, PRECISION_TARGET = 0.9, 0.8


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    lp = log_softmax(np.asarray(logits, np.float64) / temperature, axis=1)
    return float(-lp[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature that minimises held-out NLL (rows labelled MISSING left out; 1.0 when none is left)."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    keep = labels != MISSING
    if keep.sum() == 0:
        return 1.0
    x, y = logits[keep], labels[keep].astype(int)
    # Searched on log T: NLL is smooth and unimodal there, and T stays positive.
    res = minimize_scalar(lambda lt: nll(x, y, float(np.exp(lt))), bounds=(np.log(T_MIN), np.log(T_MAX)),
                          method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def calibrated_probs(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(logits / temperature)`` over the last axis."""
    return softmax(np.asarray(logits, np.float64) / temperature, axis=-1)


def threshold_presets(p_positive: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"high recall", "balanced", "high precision"}`` thresholds on P(positive) (see the module doc).
    A row is flagged when its probability is ``>=`` the threshold."""
    p, y = np.asarray(p_positive, np.float64), np.asarray(labels).astype(int)
    f1 = np.array([f1_score(y, p >= t, average="macro", zero_division=0) for t in GRID])
    rec = np.array([recall_score(y, p >= t, zero_division=0) for t in GRID])
    prec = np.array([precision_score(y, p >= t, zero_division=0) for t in GRID])
    hr = GRID[rec >= RECALL_TARGET].max() if (rec >= RECALL_TARGET).any() else GRID[0]
    hp = GRID[prec >= PRECISION_TARGET].min() if (prec >= PRECISION_TARGET).any() else GRID[int(prec.argmax())]
    return {"high recall": float(hr), "balanced": float(GRID[int(np.argmax(f1))]), "high precision": float(hp)}


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with ``bins`` equal-width confidence bins (torchmetrics' definition, L1)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = torch.as_tensor(np.asarray(probs, np.float64))
    return float(multiclass_calibration_error(p, torch.as_tensor(np.asarray(labels)).long(), num_classes=p.shape[1],
                                              n_bins=bins, norm="l1"))


def fit_calibration(schema, logits: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """``(calibration, thresholds)`` from held-out logits and labels of every task of ``schema``:
    ``calibration = {task: {"temperature": T}}``; ``thresholds`` are the presets of the (binary)
    primary task, chosen on its calibrated probabilities."""
    calibration = {t.name: {"temperature": round(fit_temperature(logits[t.name], labels[t.name]), 4)}
                   for t in schema.tasks if t.name in logits}
    y = np.asarray(labels[schema.primary])
    keep = y != MISSING
    p = calibrated_probs(logits[schema.primary][keep], calibration[schema.primary]["temperature"])[:, 1]
    return calibration, threshold_presets(p, y[keep])
