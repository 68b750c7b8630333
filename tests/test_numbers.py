"""Numbers checked against hand computation: the masked, class-weighted loss; gated tasks that keep
their head in the graph; per-task metrics; temperature scaling and threshold presets."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dhumor.model.calibration import calibrated_probs, fit_calibration, fit_temperature, threshold_presets
from dhumor.model.lit import DHumorModule
from dhumor.model.metrics import task_metrics
from dhumor.schema import MISSING, get_schema

LN3 = math.log(3.0)


def _module(**kw) -> DHumorModule:
    return DHumorModule(task="harmeme", streams=["image", "caption"], input_dims={"image": 8, "caption": 8}, **kw)


# ------------------------------------------------------------------ loss
def test_loss_masks_missing_rows_and_weights_classes_by_hand():
    m = _module(task_weights={"harmfulness": 0.5})
    m.class_weight_harmful.copy_(torch.tensor([1.0, 2.0]))
    # harmful: softmax([0, ln3]) = [1/4, 3/4]; softmax([ln3, 0]) = [3/4, 1/4]
    logits = {"harmful": torch.tensor([[0.0, LN3], [LN3, 0.0], [0.0, 0.0], [LN3, 0.0]]),
              "harmfulness": torch.tensor([[0.0, 0.0, 0.0], [LN3, 0.0, 0.0], [5.0, 5.0, 5.0], [0.0, 0.0, 0.0]]),
              "target": torch.zeros(4, 4)}
    labels = {"harmful": torch.tensor([1, 1, MISSING, 0]),
              "harmfulness": torch.tensor([2, 0, MISSING, MISSING]),
              "target": torch.tensor([3, MISSING, MISSING, MISSING])}
    total, parts = m.loss(logits, labels)
    # Weighted mean over labelled rows: sum w_y * -log p_y / sum w_y (row 3 masked out).
    harmful = (2 * -math.log(3 / 4) + 2 * -math.log(1 / 4) + 1 * -math.log(3 / 4)) / (2 + 2 + 1)
    # softmax([ln3, 0, 0]) = [3/5, 1/5, 1/5]; the all-equal row gives 1/3 to each class.
    harmfulness = (-math.log(1 / 3) - math.log(3 / 5)) / 2
    target = -math.log(1 / 4)
    assert parts["harmful"].item() == pytest.approx(harmful, abs=1e-6)
    assert parts["harmfulness"].item() == pytest.approx(harmfulness, abs=1e-6)
    assert parts["target"].item() == pytest.approx(target, abs=1e-6)
    assert total.item() == pytest.approx(harmful + 0.5 * harmfulness + target, abs=1e-6)


def test_balanced_class_weights_are_inverse_frequency():
    from types import SimpleNamespace

    m = _module(class_weights="balanced")

    class Counts:
        def class_counts(self):
            return {"harmful": [30, 10], "harmfulness": [30, 6, 4], "target": [5, 0, 3, 2]}

    m.trainer = SimpleNamespace(datamodule=Counts())  # what setup reads; no Trainer needed
    m.setup("fit")
    # n / (k * n_c): 40/(2*30), 40/(2*10); a class with no example weighs 0 (it can never be a target).
    assert m.class_weight_harmful.tolist() == pytest.approx([40 / 60, 40 / 20])
    assert m.class_weight_harmfulness.tolist() == pytest.approx([40 / 90, 40 / 18, 40 / 12])
    assert m.class_weight_target.tolist() == pytest.approx([10 / 20, 0.0, 10 / 12, 10 / 8])


def test_a_batch_without_a_gated_label_keeps_every_head_in_the_graph():
    m = _module(modality_dropout=0.0)
    m.train()
    on = torch.ones(3, dtype=torch.bool)
    batch = {"streams": {s: {"pooled": torch.randn(3, 8), "present": on} for s in ("image", "caption")}}
    labels = {"harmful": torch.tensor([0, 0, 0]), "harmfulness": torch.tensor([0, 0, 0]),
              "target": torch.full((3,), MISSING)}  # no harmful meme: no target label at all
    total, parts = m.loss(m(batch), labels)
    assert "target" not in parts and torch.isfinite(total)
    total.backward()
    no_grad = [n for n, p in m.net.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"parameters outside the graph (DDP would fail): {no_grad}"
    head = [p for n, p in m.net.named_parameters() if "target" in n]
    assert head and all(torch.count_nonzero(p.grad) == 0 for p in head)  # in the graph, but a zero loss


# ------------------------------------------------------------------ metrics
def test_binary_metrics_by_hand():
    # y:    0    0    1    1    1    MISSING
    # P(1): .2   .6   .7   .4   .9   .99      -> pred 0 1 1 0 1
    p1 = np.array([0.2, 0.6, 0.7, 0.4, 0.9, 0.99])
    probs = np.stack([1 - p1, p1], 1)
    y = np.array([0, 0, 1, 1, 1, MISSING])
    m = task_metrics(probs, y, 2)
    assert m["n"] == 5
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["confusion_matrix"] == [[1, 1], [1, 2]]  # rows true, columns predicted
    f1_neg, f1_pos = 2 * 1 / (2 * 1 + 1 + 1), 2 * 2 / (2 * 2 + 1 + 1)  # 2TP / (2TP + FP + FN)
    assert m["per_class_f1"] == pytest.approx([f1_neg, f1_pos])
    assert m["macro_f1"] == pytest.approx((f1_neg + f1_pos) / 2)
    assert m["weighted_f1"] == pytest.approx((2 * f1_neg + 3 * f1_pos) / 5)
    # AUROC = share of (positive, negative) pairs ranked right: positives .7 .4 .9 vs negatives .2 .6
    assert m["auroc"] == pytest.approx(5 / 6)  # only (.4, .6) is wrong
    assert m["support"] == [2, 3]


def test_multiclass_metrics_by_hand_and_an_absent_class():
    probs = np.array([[.8, .1, .1, 0], [.1, .8, .1, 0], [.1, .1, .8, 0], [.6, .3, .1, 0]])
    y = np.array([0, 1, 1, 1])
    m = task_metrics(probs, y, 4)
    assert m["accuracy"] == pytest.approx(2 / 4) and "auroc" not in m
    assert m["confusion_matrix"] == [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    f1 = [2 / 3, 2 / 4, 0.0, 0.0]  # class 0: TP1 FP1; class 1: TP1 FN2; class 2: FP1; class 3: never seen
    assert m["per_class_f1"] == pytest.approx(f1)
    assert m["macro_f1"] == pytest.approx(sum(f1) / 4)  # every class of the schema counts


def test_a_task_without_labels_reports_only_n():
    assert task_metrics(np.full((3, 2), .5), np.full(3, MISSING), 2) == {"n": 0}


# ------------------------------------------------------------------ calibration and presets
def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, size=(20000, 3))
    p = calibrated_probs(true_logits, 1.0)
    y = np.array([rng.choice(3, p=row) for row in p])
    overconfident = true_logits * 2.5  # the model's logits are 2.5x too sharp: T = 2.5 undoes it
    assert fit_temperature(overconfident, y) == pytest.approx(2.5, rel=0.05)
    assert fit_temperature(true_logits, y) == pytest.approx(1.0, rel=0.05)
    y_masked = y.copy()
    y_masked[::2] = MISSING  # masked rows are left out, not counted as class -1
    assert fit_temperature(overconfident, y_masked) == pytest.approx(2.5, rel=0.08)


def test_presets_on_a_constructed_distribution():
    # 10 positives: one at .3, eight at .6, one at .9; 10 negatives: six at .1, two at .4, one .7, one .95.
    p = np.array([.3] + [.6] * 8 + [.9] + [.1] * 6 + [.4] * 2 + [.7, .95])
    y = np.array([1] * 10 + [0] * 10)
    th = threshold_presets(p, y)
    # high recall: 9 of 10 positives still flagged up to 0.60, 1 of 10 at 0.61.
    # high precision: from 0.41 up the flagged are 9 positives + 2 negatives = 0.818 >= 0.8 (0.40: 9/13).
    # balanced: macro-F1 is best on (0.40, 0.60]: TP 9, FP 2, FN 1, TN 8; the lowest such threshold.
    assert th == {"high recall": 0.6, "balanced": 0.41, "high precision": 0.41}
    flagged = p >= th["high recall"]
    assert flagged[y == 1].mean() >= 0.9
    flagged = p >= th["high precision"]
    assert y[flagged].mean() >= 0.8


def test_fit_calibration_gives_every_task_a_temperature_and_primary_presets():
    schema = get_schema("harmeme")
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    logits = {"harmful": np.stack([np.zeros(400), (2 * y - 1) * 3.0 + rng.normal(0, 3, 400)], 1),
              "harmfulness": rng.normal(size=(400, 3)), "target": rng.normal(size=(400, 4))}
    labels = {"harmful": y, "harmfulness": rng.integers(0, 3, 400),
              "target": np.where(y == 1, rng.integers(0, 4, 400), MISSING)}
    cal, th = fit_calibration(schema, logits, labels)
    assert set(cal) == {"harmful", "harmfulness", "target"}
    # x ~ N(+-3, 3^2) has true log-odds 2*3*x/9 = x / 1.5: the temperature that makes it honest is 1.5.
    assert cal["harmful"]["temperature"] == pytest.approx(1.5, rel=0.2)
    assert cal["harmfulness"]["temperature"] > 5  # pure-noise logits: flattened towards uniform
    assert set(th) == {"high recall", "balanced", "high precision"}
    p = calibrated_probs(logits["harmful"], cal["harmful"]["temperature"])[:, 1]  # presets are on these
    assert (p >= th["high recall"])[y == 1].mean() >= 0.9
    assert (p >= th["high recall"] + 0.01)[y == 1].mean() < 0.9
    assert y[p >= th["high precision"]].mean() >= 0.8
