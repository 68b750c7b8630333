"""Choose TCRNet settings by k-fold cross-validation on Harm-C *train* only (val is never read).

Each candidate is a set of DHumorModule overrides; every fold trains through the real
LightningModule on cached features, with early stopping on an inner split of the fold's
training part. Prints mean and std over folds of the metrics the README reports.

    python bench/tune_cv.py --folds 5 --candidates bench/candidates.yaml
"""
from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import yaml
from sklearn.model_selection import StratifiedKFold
from torch.utils.data import DataLoader

from dhumor.cache import StageCache
from dhumor.data.datamodule import split_train_val
from dhumor.data.datasets import FeatureDataset, feature_collate
from dhumor.data.readers import read_manifest
from dhumor.encoders.features import FeatureExtractor
from dhumor.model.lit import DHumorModule
from dhumor.model.metrics import compute_metrics
from dhumor.paths import resolve_data_path
from dhumor.schema import MISSING, STREAMS
from record import Recorder, results_path



def headline(m: dict) -> dict:
    return {"harmful_acc": m["harmful"]["accuracy"], "harmful_f1": m["harmful"]["macro_f1"],
            "harmful_auroc": m["harmful"]["auroc"], "harmfulness_f1": m["harmfulness"]["macro_f1"],
            "target_f1": m["target"]["macro_f1"]}


def train_module(overrides: dict, train_memes, train_feats, dims, seed: int, max_epochs: int, batch_size: int,
                 split_seed: int | None = None, second_view=None):
    """Train a DHumorModule on one part, early stopping on a seeded inner 10% (seeded by ``split_seed``,
    default ``seed``); the best module (eval mode) and the memes and features of that inner split.

    ``second_view``: features of the same memes another way (row-aligned with ``train_feats``, e.g. OCR
    captions); the inner-train rows are trained on both views, the inner split stays one view, so no
    meme is on both sides of the split."""
    L.seed_everything(seed, workers=True, verbose=False)
    hp = dict(overrides)
    patience = hp.pop("_patience", 10)
    streams = hp.setdefault("streams", ["image", "caption"])
    module_class = hp.pop("_module_class", DHumorModule)  # e.g. bench/partial_finetune.py's module
    feature_dims = hp.pop("_feature_dims", None)  # widths of the cached features when they differ from the inputs'
    module = module_class(input_dims={s: dims[s] for s in streams}, **hp)
    module.feature_dims = feature_dims
    schema = module.schema
    tr, va = split_train_val(train_memes, 0.1, seed if split_seed is None else split_seed, schema.primary)
    pos = {id(m): i for i, m in enumerate(train_memes)}
    tr_i, va_i = [pos[id(m)] for m in tr], [pos[id(m)] for m in va]

    class Counts(L.LightningDataModule):
        def class_counts(self):
            out = {}
            for t in schema.tasks:
                y = np.array([train_memes[i].labels[t.name] for i in tr_i])
                out[t.name] = np.bincount(y[y >= 0], minlength=t.num_classes).tolist()
            return out

    dm = Counts()
    fit_memes, fit_feats = [train_memes[i] for i in tr_i], [train_feats[i] for i in tr_i]
    if second_view is not None:
        fit_memes, fit_feats = fit_memes * 2, fit_feats + [second_view[i] for i in tr_i]
    dm.train_dataloader = lambda: _loader(module, fit_memes, fit_feats, batch_size, True)
    dm.val_dataloader = lambda: _loader(module, [train_memes[i] for i in va_i], [train_feats[i] for i in va_i],
                                        batch_size, False)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(monitor="val/macro_f1", mode="max", save_top_k=1,
                                               dirpath=f"/tmp/tune_ckpt/{seed}_{time.time_ns()}")
    es = L.pytorch.callbacks.EarlyStopping(monitor="val/macro_f1", mode="max", patience=patience)
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[ckpt, es], deterministic=False)
    trainer.fit(module, datamodule=dm)
    best = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    Path(ckpt.best_model_path).unlink(missing_ok=True)
    module.load_state_dict(best, strict=False)
    module.eval()
    return module, [train_memes[i] for i in va_i], [train_feats[i] for i in va_i]


def _loader(module, memes, feats, batch_size: int, shuffle: bool) -> DataLoader:
    dims = getattr(module, "feature_dims", None) or module.hparams.input_dims
    tokens = module.hparams.inputs == "tokens" or getattr(module, "needs_tokens", False)
    collate = feature_collate(module.schema, dims, tokens)
    return DataLoader(FeatureDataset(memes, feats), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)


def predict_probs(module, memes, feats, dims=None, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Per task, the (N, classes) probabilities of a trained module on cached features."""
    probs = {t.name: [] for t in module.schema.tasks}
    with torch.no_grad():
        for batch in _loader(module, memes, feats, batch_size, False):
            for k, v in module(batch).items():
                probs[k].append(v.softmax(-1).numpy())
    return {k: np.concatenate(v) for k, v in probs.items()}


def fit_predict(overrides: dict, train_memes, train_feats, eval_memes, eval_feats, dims, seed: int,
                max_epochs: int, batch_size: int) -> dict:
    """Train on one part (early stopping on a seeded inner 10%), return metrics on the other."""
    module, _, _ = train_module(overrides, train_memes, train_feats, dims, seed, max_epochs, batch_size)
    probs = predict_probs(module, eval_memes, eval_feats)
    labels = {t.name: np.array([m.labels.get(t.name, MISSING) for m in eval_memes]) for t in module.schema.tasks}
    return headline(compute_metrics(module.schema, probs, labels))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", required=True, help="YAML: {name: {DHumorModule overrides}}")
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-epochs", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--data", default=None, help="Harm-C folder (default $DHUMOR_DATA, else data/harmeme-c)")
    ap.add_argument("--out", default=str(results_path("tune_cv")),
                    help="every candidate's fold mean and sample std (rewritten after each candidate)")
    args = ap.parse_args()
    rec = Recorder("tune_cv")
    done = []
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("dhumor").setLevel(logging.ERROR)
    torch.set_num_threads(2)

    cands = yaml.safe_load(Path(args.candidates).read_text())
    if args.only:
        cands = {k: v for k, v in cands.items() if k in args.only}
    memes = read_manifest(resolve_data_path("train.jsonl", args.data)).memes
    encoders = {}
    for c in cands.values():
        for s in STREAMS:
            key = f"{s}_encoder"
            default = {"image": "efficientnet-lite0"}.get(s, "all-mpnet-base-v2")
            encoders.setdefault((s, c.get(key, default)), None)
    feats_by_enc = {}
    for (s, name) in encoders:
        fx = FeatureExtractor({s: name}, StageCache(), progress=True)
        feats_by_enc[(s, name)] = (fx.extract(memes, [s])[0], fx.entry(s).dim)
    y = np.array([m.labels["harmfulness"] for m in memes])
    skf = StratifiedKFold(args.folds, shuffle=True, random_state=args.seed)
    for name, over in cands.items():
        streams = over.get("streams", ["image", "caption"])
        enc = {s: over.get(f"{s}_encoder", {"image": "efficientnet-lite0"}.get(s, "all-mpnet-base-v2")) for s in streams}
        feats = [{s: feats_by_enc[(s, enc[s])][0][i][s] for s in streams} for i in range(len(memes))]
        dims = {s: feats_by_enc[(s, enc[s])][1] for s in streams}
        t0 = time.time()
        rows = []
        for f, (tr, te) in enumerate(skf.split(np.zeros(len(y)), y)):
            rows.append(fit_predict(over, [memes[i] for i in tr], [feats[i] for i in tr], [memes[i] for i in te],
                                    [feats[i] for i in te], dims, args.seed + f, args.max_epochs, args.batch_size))
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        std = {k: float(np.std([r[k] for r in rows], ddof=1)) for k in rows[0]}  # sample std over folds
        res = {"candidate": name, "overrides": over, "folds": args.folds, "mean": mean, "std": std,
               "seconds": round(time.time() - t0, 1)}
        print(json.dumps(res), flush=True)
        done.append(res)
        rec.write({"seed": args.seed, "max_epochs": args.max_epochs, "std": "sample (ddof=1) over folds",
                   "candidates": done}, args.out)


if __name__ == "__main__":
    main()
