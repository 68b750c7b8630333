"""Turn a training run's export into the shipped default: threshold presets chosen on the run's
own held-out split of train (never on Harm-C val), val metrics measured once, and a model card.

    python bench/ship_checkpoint.py runs/results/TCRNet_caption_image-seed0/lightning_logs/version_0/export \
        --results outputs/results/harmeme_val.json --out checkpoints/harmeme-tcrnet
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score

from dhumor.checkpoint import read_checkpoint, write_checkpoint
from dhumor.data.datamodule import split_train_val
from dhumor.data.readers import read_manifest
from dhumor.evaluation import evaluate
from dhumor.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def presets(p: np.ndarray, y: np.ndarray) -> dict:
    """Thresholds on P(positive): best macro-F1 (balanced), recall >= 0.9 (high recall),
    precision >= 0.8 (high precision; the most precise threshold if 0.8 is never reached)."""
    grid = np.round(np.arange(0.05, 0.96, 0.01), 2)
    f1 = [f1_score(y, p >= t, average="macro", zero_division=0) for t in grid]
    rec = np.array([recall_score(y, p >= t, zero_division=0) for t in grid])
    prec = np.array([precision_score(y, p >= t, zero_division=0) for t in grid])
    hr = grid[rec >= 0.9].max() if (rec >= 0.9).any() else grid[0]
    hp = grid[prec >= 0.8].min() if (prec >= 0.8).any() else grid[int(prec.argmax())]
    return {"high recall": float(hr), "balanced": float(grid[int(np.argmax(f1))]), "high precision": float(hp)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--results", default=None, help="harmeme_results.py output, for the seed summary")
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "harmeme-tcrnet"))
    args = ap.parse_args(argv)
    meta, state = read_checkpoint(args.export)
    cfg = meta["config"]["data"]
    pipe = Pipeline.from_checkpoint(args.export)
    train = read_manifest(ROOT / cfg["train"]).memes
    _, dev = split_train_val(train, cfg["val_fraction"], cfg["split_seed"], pipe.schema.primary)
    pred = pipe.predict_memes(dev)
    y = np.array([dev[i].labels["harmful"] for i in pred.kept])
    th = presets(pred.probs["harmful"][:, 1], y)
    val_metrics, _ = evaluate(pipe, ROOT / cfg["test"])
    meta["thresholds"] = th
    meta["metrics"] = {**meta["metrics"], "harmeme_c_val": val_metrics,
                       "threshold_source": f"held-out {cfg['val_fraction']:.0%} of Harm-C train (split_seed "
                                           f"{cfg['split_seed']}), n={len(dev)}"}
    if args.results:
        res = json.loads(Path(args.results).read_text())
        meta["metrics"]["seed_summary_harmeme_c_val"] = res["summary"]
    write_checkpoint(state, meta, args.out)
    print(json.dumps({"thresholds": th, "val": {t: {k: m.get(k) for k in ("accuracy", "macro_f1", "auroc", "n")}
                                                for t, m in val_metrics.items()}}, indent=1))


if __name__ == "__main__":
    main()
