"""Issue 13: how far the offline encoders go on Harm-C, every choice made on train only.

Directions, all on frozen features from the stage cache:
- more signal per stream: MPNet+MiniLM captions, EfficientNet-Lite0+Lite2 images (pooled vectors
  concatenated per stream);
- retrieval: the labels of the k nearest *training* memes in caption and image embedding space as
  an extra stream (leave-one-out on the index, so a meme never sees its own label);
- ensembles of seeds (probabilities averaged);
- calibration: temperature scaling fitted on the selection split (the seeded 10% of train).

Stage 1 (``cv``): 5-fold cross-validation on Harm-C train for every candidate (val never read).
Stage 2 (``val``): the candidates named by ``--report`` trained on all of train (selection on the
seeded 10% of train, as `dhumor fit` does), evaluated once on Harm-C val, seeds 0 1 2.
Results (every candidate, losers included) go to bench/results/accuracy_results.json and .md; the
reliability diagram of the chosen model to docs/reliability.png.

    export DHUMOR_DATA=...   # the Harm-C folder
    python bench/accuracy_search.py                      # both stages, everything
    python bench/accuracy_search.py --stage cv --only base concat_caption
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harmeme_results import quiet  # noqa: E402
from record import Recorder, results_path  # noqa: E402
from tune_cv import headline, predict_probs, train_module  # noqa: E402

from dhumor.cache import StageCache  # noqa: E402
from dhumor.data.readers import read_manifest  # noqa: E402
from dhumor.encoders.features import FeatureExtractor, StreamFeature  # noqa: E402
from dhumor.model import calibration  # noqa: E402
from dhumor.model.calibration import calibrated_probs, expected_calibration_error  # noqa: E402
from dhumor.model.metrics import compute_metrics  # noqa: E402
from dhumor.paths import data_root  # noqa: E402
from dhumor.schema import MISSING, get_schema  # noqa: E402
from dhumor.util.files import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = get_schema("harmeme")
LITE0, LITE2, MPNET, MINILM = "efficientnet-lite0", "efficientnet-lite2", "all-mpnet-base-v2", "all-minilm-l6-v2"

# name -> {"image": [encoders], "caption": [encoders], "retrieval": {k, spaces} | None, "ensemble": n,
#          "module": DHumorModule overrides}
CANDIDATES: dict[str, dict] = {
    # TCRNet heads (the shipped model's head); ~1 min per epoch on the shared 2-core CPU at nice 10.
    "base": {},  # the shipped head: Lite0 image, MPNet caption
    "concat_caption": {"caption": [MPNET, MINILM]},
    "concat_image": {"image": [LITE0, LITE2]},
    "lite2_image": {"image": [LITE2]},
    "concat_both": {"image": [LITE0, LITE2], "caption": [MPNET, MINILM]},
    "retrieval_k10": {"retrieval": {"k": 10}},
    "retrieval_k30": {"retrieval": {"k": 30}},
    "ensemble3": {"ensemble": 3},
    "ocr_train": {"ocr_train": True},  # OCR-robust: every training meme also with its OCR caption
    # Token sequences instead of pooled vectors (Lite0's 7x7 feature map, MPNet's caption tokens): TCRNet's
    # cross-attention reads every token; ~4x the pooled head's time per epoch here.
    "tokens": {"module": {"inputs": "tokens"}},
    # Fine-tuning the encoders' top layers from cached lower-layer states (bench/partial_finetune.py):
    # {stream: top layers/blocks trained}; the encoders' learning rate in "module".
    "ft_caption1": {"finetune": {"caption": 1}, "module": {"encoder_lr": 3e-5}},
    "ft_caption2": {"finetune": {"caption": 2}, "module": {"encoder_lr": 3e-5}},
    "ft_image1": {"finetune": {"image": 1}, "module": {"encoder_lr": 1e-4}},
    "ft_both1": {"finetune": {"caption": 1, "image": 1}, "module": {"encoder_lr": 3e-5}},
    # Linear probes (class-balanced logistic regression on the concatenated streams): seconds per fit,
    # so every direction's signal can be measured on this CPU.
    "lin_base": {"head": "linear"},
    "lin_base_C0.1": {"head": "linear", "linear_C": 0.1},
    "lin_base_C0.001": {"head": "linear", "linear_C": 0.001},
    "lin_concat_caption": {"head": "linear", "caption": [MPNET, MINILM]},
    "lin_retrieval_k10": {"head": "linear", "retrieval": {"k": 10}},
    "lin_retrieval_k30": {"head": "linear", "retrieval": {"k": 30}},
    "lin_retrieval_only_k10": {"head": "linear", "retrieval": {"k": 10}, "image": [], "caption": []},
    "lin_concat_caption_retrieval_k10": {"head": "linear", "caption": [MPNET, MINILM], "retrieval": {"k": 10}},
}
DEFAULT = {"image": [LITE0], "caption": [MPNET], "retrieval": None, "ensemble": 1, "module": {}, "head": "tcrnet",
           "linear_C": 0.01, "ocr_train": False, "finetune": None}
OCR_ENGINE = "rapidocr"  # what `dhumor score` reads by default


def spec(name: str) -> dict:
    s = {**DEFAULT, **CANDIDATES[name]}
    s["module"] = {**DEFAULT["module"], **s["module"]}
    return s


# ---------------------------------------------------------------- features
class Pooled:
    """Pooled frozen features of every (stream, encoder) pair, for one list of memes (row order)."""

    def __init__(self, memes, cache: StageCache):
        self.memes, self.cache, self.arrays, self.feats, self.lowers = memes, cache, {}, {}, {}

    def get(self, stream: str, encoder: str) -> tuple[np.ndarray, np.ndarray]:
        """(N, D) float32 vectors and an (N,) bool "present" mask."""
        if (stream, encoder) not in self.arrays:
            fx = FeatureExtractor({stream: encoder}, self.cache, progress=True)
            feats, errors = fx.extract(self.memes, [stream])
            if errors:
                raise SystemExit(f"{len(errors)} unusable images, e.g. {next(iter(errors.values()))}")
            dim = fx.entry(stream).dim
            x = np.stack([f[stream].pooled.astype(np.float32) if f.get(stream) is not None else np.zeros(dim, np.float32)
                          for f in feats])
            present = np.array([f.get(stream) is not None for f in feats])
            self.arrays[(stream, encoder)] = (x, present)
            self.feats[(stream, encoder)] = [f.get(stream) for f in feats]
        return self.arrays[(stream, encoder)]

    def lower(self, stream: str, encoder: str, k: int) -> list[StreamFeature | None]:
        """Per meme, the cached states entering the encoder's top ``k`` layers (bench/partial_finetune.py)."""
        from partial_finetune import lower_features

        if (stream, encoder, k) not in self.lowers:
            self.lowers[(stream, encoder, k)] = lower_features(self.memes, stream, encoder, k, self.cache)
        return self.lowers[(stream, encoder, k)]

    def features(self, stream: str, encoder: str) -> list[StreamFeature | None]:
        """Per meme, the cached feature with its token sequence (None: no input for the stream)."""
        self.get(stream, encoder)
        return self.feats[(stream, encoder)]


def ocr_view(memes, cache: StageCache):
    """The same memes with the caption an OCR engine reads from the image (what serving sees), through
    the stage cache (`dhumor ocr <manifest>` fills it ahead)."""
    from dataclasses import replace

    from dhumor.ocr import OCR

    ocr = OCR(OCR_ENGINE, cache)
    return [replace(m, caption=ocr.read_file(m.image)) for m in memes]


def label_matrix(memes) -> np.ndarray:
    """Per meme: harmful (1), harmfulness one-hot (3), target one-hot (4; zeros when absent)."""
    out = np.zeros((len(memes), 8), np.float32)
    for i, m in enumerate(memes):
        out[i, 0] = m.labels["harmful"]
        out[i, 1 + m.labels["harmfulness"]] = 1
        if m.labels.get("target", MISSING) != MISSING:
            out[i, 4 + m.labels["target"]] = 1
    return out


def retrieval_features(query: np.ndarray, index: np.ndarray, index_labels: np.ndarray, k: int,
                       same: bool) -> np.ndarray:
    """Similarity-weighted label averages of the k nearest index rows (cosine), plus the top and mean
    similarity. ``same``: query is the index itself, and each row's own entry is left out."""
    q = query / np.linalg.norm(query, axis=1, keepdims=True).clip(1e-6)
    x = index / np.linalg.norm(index, axis=1, keepdims=True).clip(1e-6)
    sim = q @ x.T
    if same:
        np.fill_diagonal(sim, -np.inf)
    nn = np.argpartition(-sim, k, axis=1)[:, :k]
    s = np.take_along_axis(sim, nn, 1)
    w = np.exp(s * 10)  # sharper weight for closer neighbours; near-duplicates dominate
    w = w / w.sum(1, keepdims=True)
    lab = index_labels[nn]  # (Q, k, 8)
    avg = (w[..., None] * lab).sum(1)
    # Target: averaged over harmful neighbours only (the others have no target).
    harm_w = w * lab[..., 0]
    tgt = (harm_w[..., None] * lab[..., 4:]).sum(1) / harm_w.sum(1, keepdims=True).clip(1e-6)
    return np.concatenate([avg[:, :4], tgt, s.max(1, keepdims=True), s.mean(1, keepdims=True)], 1).astype(np.float32)


def stream_arrays(s: dict, pooled: Pooled, rows: np.ndarray) -> dict[str, np.ndarray]:
    """Per stream, the concatenated pooled vectors of ``rows``."""
    out = {}
    for stream in ("image", "caption"):
        if s[stream]:
            out[stream] = np.concatenate([pooled.get(stream, e)[0][rows] for e in s[stream]], 1)
    return out


def build_arrays(s: dict, pooled_tr: Pooled, rows_tr: np.ndarray, evals: list[tuple[Pooled, np.ndarray]]):
    """Per stream arrays for the training rows and each eval set; retrieval uses only the training rows
    as its index (leave-one-out for the training rows themselves)."""
    tr = stream_arrays(s, pooled_tr, rows_tr)
    ev = [stream_arrays(s, p, r) for p, r in evals]
    if s["retrieval"]:
        k = s["retrieval"]["k"]
        lab = label_matrix([pooled_tr.memes[i] for i in rows_tr])
        space = {st: pooled_tr.get(st, e)[0][rows_tr] for st, e in (("image", LITE0), ("caption", MPNET))}
        tr["reasoning"] = np.concatenate([retrieval_features(space[st], space[st], lab, k, True) for st in space], 1)
        for (p, r), d in zip(evals, ev):
            d["reasoning"] = np.concatenate([retrieval_features(p.get(st, e)[0][r], space[st], lab, k, False)
                                             for st, e in (("image", LITE0), ("caption", MPNET))], 1)
    return tr, ev


def stream_features(s: dict, p: Pooled, stream: str, encoder: str) -> list[StreamFeature | None]:
    """Per meme, what a token-reading candidate gets for one stream: the states entering the fine-tuned top
    layers, the cached token sequence (token inputs), or the pooled vector with a one-token stand-in (a
    frozen stream of a fine-tuning candidate: keeps the token batch small)."""
    if s["finetune"] and stream in s["finetune"]:
        return p.lower(stream, encoder, s["finetune"][stream])
    if not s["finetune"]:
        return p.features(stream, encoder)
    x, present = p.get(stream, encoder)
    return [StreamFeature(np.zeros((1, x.shape[1]), np.float16), x[i]) if present[i] else None for i in range(len(x))]


def build_inputs(s: dict, pooled_tr: Pooled, rows_tr: np.ndarray, evals: list[tuple[Pooled, np.ndarray]]):
    """:func:`build_arrays` as StreamFeature dicts (what the LightningModule's collate reads), and the widths.
    Token-input and fine-tuning candidates get token sequences instead (:func:`stream_features`)."""
    if s["finetune"] or s["module"].get("inputs") == "tokens":
        if s["retrieval"] or len(s["image"]) > 1 or len(s["caption"]) > 1 or s["ocr_train"]:
            raise SystemExit("token inputs / partial fine-tuning: one encoder per stream, no retrieval, "
                             "no OCR-view training")
        streams = {st: s[st][0] for st in ("image", "caption") if s[st]}

        def rows(p: Pooled, r):
            per = {st: stream_features(s, p, st, e) for st, e in streams.items()}
            return [{st: per[st][i] for st in streams if per[st][i] is not None} for i in r]
        return (rows(pooled_tr, rows_tr), [rows(p, r) for p, r in evals],
                {st: pooled_tr.get(st, e)[0].shape[1] for st, e in streams.items()})
    tr, ev = build_arrays(s, pooled_tr, rows_tr, evals)
    return to_feats(tr), [to_feats(d) for d in ev], {k: v.shape[1] for k, v in tr.items()}


def to_feats(arrays: dict[str, np.ndarray]) -> list[dict[str, StreamFeature]]:
    n = len(next(iter(arrays.values())))
    return [{st: StreamFeature(np.zeros((1, a.shape[1]), np.float16), a[i]) for st, a in arrays.items()} for i in range(n)]


# ---------------------------------------------------------------- calibration
def ece(probs: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE (the library's, torchmetrics underneath)."""
    return expected_calibration_error(probs, labels, bins)


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The library's temperature fit (minimum NLL) on probabilities: log p are logits up to a constant."""
    return calibration.fit_temperature(np.log(probs.clip(1e-12)), labels)


def scale(probs: np.ndarray, t: float) -> np.ndarray:
    return calibrated_probs(np.log(probs.clip(1e-12)), t)


# ---------------------------------------------------------------- training
def labels_of(memes) -> dict[str, np.ndarray]:
    return {t.name: np.array([m.labels.get(t.name, MISSING) for m in memes]) for t in SCHEMA.tasks}


def train_predict(s: dict, memes_tr, feats_tr, dims, evals: list, seed: int, split_seed: int,
                  max_epochs: int, second_view=None) -> tuple[list[dict], dict, dict]:
    """Train ``s['ensemble']`` models (seeds seed*100+j), average their probabilities on each eval set
    and on the selection split; returns (eval probs, selection probs, selection labels).
    ``second_view``: OCR-caption features of the training memes (candidates with ``ocr_train``)."""
    over = {**s["module"], "streams": list(dims), "task": "harmeme"}
    if s["finetune"]:
        from partial_finetune import PartialFinetuneModule

        first = next(f for f in feats_tr if all(st in f for st in dims))
        over.update(_module_class=PartialFinetuneModule, top_layers=s["finetune"],
                    _feature_dims={st: first[st].tokens.shape[1] for st in dims})
    outs, sel = [], None
    for j in range(s["ensemble"]):
        member_seed = seed if s["ensemble"] == 1 else seed * 100 + j
        module, sel_memes, sel_feats = train_module(over, memes_tr, feats_tr, dims, member_seed, max_epochs, 64,
                                                    split_seed=split_seed, second_view=second_view)
        outs.append([predict_probs(module, m, f, dims) for m, f in evals])
        p = predict_probs(module, sel_memes, sel_feats, dims)
        sel = p if sel is None else {k: sel[k] + p[k] for k in p}
    avg = [{k: np.mean([o[e][k] for o in outs], 0) for k in outs[0][e]} for e in range(len(evals))]
    sel = {k: v / s["ensemble"] for k, v in sel.items()}
    return avg, sel, labels_of(sel_memes)


def linear_predict(s: dict, memes_tr, arrays_tr: dict, evals: list[dict], split_seed: int):
    """The linear probe: per task, class-balanced logistic regression on the standardised concatenation of
    every stream, fitted on the training part (the seeded selection 10% held out, as for TCRNet)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from dhumor.data.datamodule import split_train_val

    x = np.concatenate([arrays_tr[k] for k in sorted(arrays_tr)], 1)
    xe = [np.concatenate([d[k] for k in sorted(d)], 1) for d in evals]
    pos = {id(m): i for i, m in enumerate(memes_tr)}
    tr, va = split_train_val(memes_tr, 0.1, split_seed, SCHEMA.primary)
    tr_i, va_i = np.array([pos[id(m)] for m in tr]), np.array([pos[id(m)] for m in va])
    y = labels_of(memes_tr)
    out, sel = [{} for _ in evals], {}
    for t in SCHEMA.tasks:
        keep = tr_i[y[t.name][tr_i] != MISSING]
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=s["linear_C"], class_weight="balanced",
                                                                 max_iter=300))
        clf.fit(x[keep], y[t.name][keep])
        full = lambda p: np.eye(t.num_classes)[:, clf.classes_] @ p.T  # noqa: E731  (absent classes: prob 0)
        for o, z in zip(out, xe):
            o[t.name] = full(clf.predict_proba(z)).T
        sel[t.name] = full(clf.predict_proba(x[va_i])).T
    return out, sel, labels_of(va)


def summarize(probs: dict, labels: dict, sel_probs: dict, sel_labels: dict, ocr_probs: dict | None = None) -> dict:
    """Headline metrics, plus the harmful ECE before and after temperature scaling fitted on the
    selection split; with ``ocr_probs`` (the same memes read with OCR captions) their headline too."""
    m = headline(compute_metrics(SCHEMA, probs, labels))
    if ocr_probs is not None:
        m.update({f"ocr_{k}": v for k, v in headline(compute_metrics(SCHEMA, ocr_probs, labels)).items()})
    t = fit_temperature(sel_probs["harmful"], sel_labels["harmful"])
    m["harmful_ece"] = ece(probs["harmful"], labels["harmful"])
    m["temperature"] = t
    m["harmful_ece_calibrated"] = ece(scale(probs["harmful"], t), labels["harmful"])
    return m


def run_cv(name: str, memes, pooled: Pooled, folds: int, max_epochs: int, pooled_ocr: Pooled | None = None) -> dict:
    """``pooled_ocr``: the OCR view of the same memes; TCRNet candidates are then also scored on the
    held-out fold's OCR captions (``ocr_*`` metrics), and ``ocr_train`` candidates train on both views."""
    from sklearn.model_selection import StratifiedKFold

    s = spec(name)
    if s["ocr_train"] and (pooled_ocr is None or s["retrieval"]):
        raise SystemExit(f"{name}: OCR-view training needs --ocr (and no retrieval)")
    y = np.array([m.labels["harmfulness"] for m in memes])
    rows, t0 = [], time.time()
    for f, (tr, te) in enumerate(StratifiedKFold(folds, shuffle=True, random_state=0).split(np.zeros(len(y)), y)):
        mt, me = [memes[i] for i in tr], [memes[i] for i in te]
        if s["head"] == "linear":
            a_tr, (a_te,) = build_arrays(s, pooled, tr, [(pooled, te)])
            (probs,), sel, sel_lab = linear_predict(s, mt, a_tr, [a_te], f)
            rows.append(summarize(probs, labels_of(me), sel, sel_lab))
            continue
        ocr = pooled_ocr is not None and not s["retrieval"]
        evals = [(pooled, te)] + ([(pooled_ocr, te)] if ocr else [])
        feats_tr, feats_ev, dims = build_inputs(s, pooled, tr, evals)
        second = build_inputs(s, pooled_ocr, tr, [])[0] if s["ocr_train"] else None
        probs, sel, sel_lab = train_predict(s, mt, feats_tr, dims, [(me, fe) for fe in feats_ev], f, f, max_epochs,
                                            second_view=second)
        rows.append(summarize(probs[0], labels_of(me), sel, sel_lab, ocr_probs=probs[1] if ocr else None))
    return {"candidate": name, "spec": s, "folds": folds, **mean_std(rows), "seconds": round(time.time() - t0, 1)}


def run_val(name: str, train, pooled_tr: Pooled, val, pooled_val: Pooled, seeds, max_epochs: int,
            ocr_tr: Pooled | None = None, ocr_val: Pooled | None = None) -> tuple[dict, list]:
    """``ocr_val``: val with OCR captions (no gold caption: the end-to-end condition), reported as
    ``ocr_*``; ``ocr_tr``: the OCR view of train, for ``ocr_train`` candidates."""
    s = spec(name)
    all_tr, all_val = np.arange(len(train)), np.arange(len(val))
    use_ocr = ocr_val is not None and s["head"] != "linear" and not s["retrieval"]
    if s["ocr_train"] and (ocr_tr is None or not use_ocr):
        raise SystemExit(f"{name}: OCR-view training needs --ocr (and no retrieval)")
    second = None
    if s["head"] == "linear":
        a_tr, (a_val,) = build_arrays(s, pooled_tr, all_tr, [(pooled_val, all_val)])
        seeds = seeds[:1]  # deterministic: one run
    else:
        evals = [(pooled_val, all_val)] + ([(ocr_val, all_val)] if use_ocr else [])
        feats_tr, feats_ev, dims = build_inputs(s, pooled_tr, all_tr, evals)
        second = build_inputs(s, ocr_tr, all_tr, [])[0] if s["ocr_train"] else None
    rows, kept, t0 = [], [], time.time()
    for seed in seeds:
        t1 = time.process_time()
        if s["head"] == "linear":
            (probs,), sel, sel_lab = linear_predict(s, train, a_tr, [a_val], 0)
            ocr_probs = None
        else:
            ps, sel, sel_lab = train_predict(s, train, feats_tr, dims, [(val, fe) for fe in feats_ev], seed, 0,
                                             max_epochs, second_view=second)
            probs, ocr_probs = ps[0], (ps[1] if use_ocr else None)
        r = summarize(probs, labels_of(val), sel, sel_lab, ocr_probs=ocr_probs)
        r["train_cpu_seconds"] = round(time.process_time() - t1, 1)
        rows.append(r)
        kept.append((probs, sel, sel_lab, r["temperature"], ocr_probs))
    res = {"candidate": name, "spec": s, "seeds": list(seeds), **mean_std(rows),
           "seconds": round(time.time() - t0, 1)}
    # The seeds' models as one ensemble (probabilities averaged; all share the selection split, split seed 0).
    avg = lambda i: {k: np.mean([kp[i][k] for kp in kept], 0) for k in kept[0][i]}  # noqa: E731
    res["seed_ensemble"] = summarize(avg(0), labels_of(val), avg(1), kept[0][2],
                                     ocr_probs=avg(4) if use_ocr else None)
    return res, kept


def mean_std(rows: list[dict]) -> dict:
    """Mean and sample std (ddof=1, the documentation's one convention; None for a single run) over folds or
    seeds, and the runs themselves (so a table can always be recomputed)."""
    one = len(rows) == 1  # a single run has no spread
    return {"mean": {k: float(np.mean([r[k] for r in rows])) for k in rows[0]},
            "std": {k: None if one else float(np.std([r[k] for r in rows], ddof=1)) for k in rows[0]},
            "runs": rows}


# ---------------------------------------------------------------- reporting
COLS = [("harmful_acc", "harmful acc"), ("harmful_f1", "harmful macro-F1"), ("harmful_auroc", "harmful AUROC"),
        ("harmfulness_f1", "3-level macro-F1"), ("target_f1", "target macro-F1"), ("harmful_ece", "ECE"),
        ("harmful_ece_calibrated", "ECE (T on selection split)"), ("ocr_harmful_f1", "harmful macro-F1, OCR captions"),
        ("ocr_harmful_auroc", "harmful AUROC, OCR captions")]


def cell(stats: dict, key: str, spread: dict | None = None) -> str:
    if key not in stats:
        return "—"  # not measured for this candidate (OCR columns: run with --ocr)
    return f"{stats[key]:.3f}" + ("" if spread is None else f" ± {spread[key]:.3f}")


def table(rows: list[dict]) -> str:
    head = "| candidate | " + " | ".join(c for _, c in COLS) + " | seconds |\n" + "|---" * (len(COLS) + 2) + "|\n"
    body = ""
    for r in rows:
        one = len(r["runs"]) == 1  # a deterministic head (linear probe): one run, no spread
        cells = [cell(r["mean"], k, None if one else r["std"]) for k, _ in COLS]
        body += f"| {r['candidate']} | " + " | ".join(cells) + f" | {r['seconds']} |\n"
    return head + body


def ensemble_table(val: dict) -> str:
    out = "| candidate | " + " | ".join(c for _, c in COLS) + " |\n" + "|---" * (len(COLS) + 1) + "|\n"
    for name, r in val.items():
        if "seed_ensemble" in r and len(r["seeds"]) > 1:
            out += f"| {name}, seeds {r['seeds']} averaged | " + " | ".join(
                cell(r["seed_ensemble"], k) for k, _ in COLS) + " |\n"
    return out


def reliability_png(probs_t: list[tuple[np.ndarray, np.ndarray, str]], path: Path, bins: int = 15) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=1, label="perfect")
    edges = np.linspace(0, 1, bins + 1)
    for probs, labels, label in probs_t:
        conf, correct = probs.max(1), probs.argmax(1) == labels
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.sum() >= 3:
                xs.append(conf[m].mean())
                ys.append(correct[m].mean())
        ax.plot(xs, ys, "o-", label=f"{label} (ECE {ece(probs, labels):.3f})")
    ax.set_xlabel("confidence (top class)")
    ax.set_ylabel("accuracy")
    ax.set_title("Harm-C val, harmful task")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage", choices=["cv", "val", "all", "report"], default="all",
                    help="report: only rewrite the .md from the .json")
    ap.add_argument("--only", nargs="*", default=list(CANDIDATES), help="candidates for the CV stage")
    ap.add_argument("--report", nargs="*", default=["base", "concat_caption", "concat_image", "retrieval_k10",
                                                    "ensemble3"],
                    help="candidates trained on all of train and reported on val")
    ap.add_argument("--final", default=None,
                    help="the candidate whose reliability diagram goes to docs/ (default: the last reported; "
                         "none: no diagram)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--ocr", action="store_true",
                    help="also score TCRNet candidates on OCR captions (held-out fold / val) and allow ocr_train; "
                         "fill the OCR cache first: dhumor ocr <data>/train.jsonl and val.jsonl")
    ap.add_argument("--out", default=str(results_path("accuracy_results")))
    args = ap.parse_args(argv)
    quiet()
    import logging
    logging.getLogger("dhumor").setLevel(logging.ERROR)
    torch.set_num_threads(2)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {"cv": {}, "val": {}}
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, no GPU"
    for stage in ("cv", "val"):  # files written before one std convention: recompute from the kept runs
        for entry in result.get(stage, {}).values():
            if entry.get("runs"):
                entry.update({k: v for k, v in mean_std(entry["runs"]).items() if k == "std"})
    rec = Recorder("accuracy_results")

    def save():
        result["last_run"] = rec.provenance()
        atomic_write(out, json.dumps(result, indent=1))
        md = ["# Issue 13: accuracy search on Harm-C (`python bench/accuracy_search.py`)", "",
              f"Machine: {result['machine']}. Candidates: see CANDIDATES in bench/accuracy_search.py.", "",
              f"## {args.folds}-fold cross-validation on Harm-C train (choices made here; at most {args.max_epochs} "
              f"epochs, early stopping on a seeded 10% of each training part), mean ± sample std over folds", "",
              table(list(result["cv"].values())), "",
              "## Harm-C val (reported, never used to choose), seeds 0 1 2, mean ± sample std "
              "(linear probes are deterministic: one run)", "",
              table(list(result["val"].values())), "",
              "Seed ensembles (the three seeds' models averaged; one number each):", "",
              ensemble_table(result["val"])]
        atomic_write(out.with_suffix(".md"), "\n".join(md) + "\n")

    if args.stage == "report":  # tables from the kept runs: no data, no features
        save()
        return
    cache = StageCache()
    train = read_manifest(data_root() / "train.jsonl").memes
    pooled_tr = Pooled(train, cache)
    # The OCR view of train (3,000 OCR reads when not cached) only where something trains or is scored on it.
    needs_ocr_tr = args.ocr and (args.stage in ("cv", "all") or any(spec(n)["ocr_train"] for n in args.report))
    ocr_tr = Pooled(ocr_view(train, cache), cache) if needs_ocr_tr else None

    if args.stage in ("cv", "all"):
        for name in args.only:
            r = run_cv(name, train, pooled_tr, args.folds, args.max_epochs, ocr_tr)
            result["cv"][name] = r
            print(json.dumps({"cv": name, "mean": r["mean"], "seconds": r["seconds"]}), flush=True)
            save()
    if args.stage in ("val", "all"):
        val = read_manifest(data_root() / "val.jsonl").memes
        pooled_val = Pooled(val, cache)
        ocr_val = Pooled(ocr_view(val, cache), cache) if args.ocr else None
        for name in args.report:
            r, kept = run_val(name, train, pooled_tr, val, pooled_val, args.seeds, args.max_epochs, ocr_tr, ocr_val)
            result["val"][name] = r
            print(json.dumps({"val": name, "mean": r["mean"], "std": r["std"]}), flush=True)
            save()
            if args.final != "none" and name == (args.final or args.report[-1]):
                y = labels_of(val)["harmful"]
                probs, _, _, t, _ = kept[0]
                reliability_png([(probs["harmful"], y, f"{name}, seed {args.seeds[0]}"),
                                 (scale(probs["harmful"], t), y, f"temperature {t:.2f}")],
                                ROOT / "docs" / "reliability.png")
    save()


if __name__ == "__main__":
    main()
