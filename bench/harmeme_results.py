"""The README's Harm-C val table: each variant trained through `dhumor fit` with several seeds,
selected on a seeded 10% of train, then evaluated once on Harm-C val (never used for any choice).

    DHUMOR_DATA=/path/to/harmeme-c python bench/harmeme_results.py --seeds 0 1 2      # writes bench/results/harmeme_val.json
    python bench/harmeme_results.py --data /path/to/harmeme-c      # the same, without the variable

Spreads are sample standard deviations (ddof=1) over the seeds.

Also reproduces the floor (class-balanced logistic regression on frozen all-mpnet-base-v2 caption
features) and times feature extraction on a cold cache.
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from dhumor.paths import resolve_data_path
from dhumor.util.files import atomic_write
from record import Recorder, refuse_subset_over_default, results_path

ROOT = Path(__file__).resolve().parent.parent
# The data root's splits (``--data`` / $DHUMOR_DATA / data/harmeme-c); main() re-resolves them for --data.
TRAIN, VAL = resolve_data_path("train.jsonl"), resolve_data_path("val.jsonl")
VARIANTS = {
    "caption only": ["configs/ablations/caption-only.yaml"],
    "image only": ["configs/ablations/image-only.yaml"],
    "TCRNet caption+image": [],
}


def headline(m: dict) -> dict:
    """The numbers the README's tables report, from `dhumor evaluate`'s metrics."""
    return {"harmful_acc": m["harmful"]["accuracy"], "harmful_macro_f1": m["harmful"]["macro_f1"],
            "harmful_auroc": m["harmful"]["auroc"], "harmfulness_macro_f1": m["harmfulness"]["macro_f1"],
            "target_macro_f1": m["target"].get("macro_f1")}


def quiet() -> None:
    """Only warnings and errors from Lightning: the scripts print one JSON line per run."""
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


def fit(configs: list[str], seed: int, run_dir: Path, extra_args: list[str]) -> tuple[Path, float]:
    """`dhumor fit` with configs/harmeme.yaml plus ``configs`` (repository-relative); this run's exported
    checkpoint (its own log_dir, never an older version's) and the wall seconds the fit took."""
    from dhumor.cli import run_lightning

    args = ["fit", "--config", str(ROOT / "configs" / "harmeme.yaml")]
    for c in configs:
        args += ["--config", str(ROOT / c)]
    args += ["--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
             "--trainer.enable_progress_bar", "false", "--data.progress", "false",
             "--data.root", str(TRAIN.parent), *extra_args]
    t0 = time.perf_counter()
    cli = run_lightning(args)
    export = Path(cli.trainer.log_dir) / "export"
    if not (export / "dhumor.json").exists():
        raise RuntimeError(f"{export}: this run exported no checkpoint")
    return export, time.perf_counter() - t0


def mean_std(rows: list[dict], keys: list[str]) -> dict:
    """``{key: [mean, sample std]}`` over the runs (ddof=1; None values, e.g. a task without labels, left
    out; std None with a single run)."""
    out = {}
    for k in keys:
        vals = [r[k] for r in rows if r[k] is not None]
        # Six decimals: the documentation rounds to three, and rounding twice can move the last digit.
        std = round(float(np.std(vals, ddof=1)), 6) if len(vals) > 1 else None
        out[k] = [round(float(np.mean(vals)), 6), std]
    return out


def run_variant(name: str, extra: list[str], seed: int, root: Path, extra_args: list[str]) -> dict:
    from dhumor.inference.evaluation import evaluate
    from dhumor.inference.pipeline import Pipeline

    run_dir = root / f"{name.replace(' ', '_').replace('+', '_')}-seed{seed}"
    export, fit_seconds = fit(extra, seed, run_dir, extra_args)
    metrics, _ = evaluate(Pipeline.from_checkpoint(export), VAL)
    meta = json.loads((export / "dhumor.json").read_text())
    return {"variant": name, "seed": seed, "fit_seconds": round(fit_seconds, 1), "export": str(export),
            "selection": meta["metrics"]["selection"], **headline(metrics), "metrics": metrics}


def logistic_floor() -> dict:
    """Class-balanced logistic regression on frozen all-mpnet-base-v2 caption features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

    from dhumor.cache import StageCache
    from dhumor.data.readers import read_manifest
    from dhumor.encoders.features import FeatureExtractor

    fx = FeatureExtractor({"caption": "all-mpnet-base-v2"}, StageCache(), progress=False)
    out = {}
    data = {}
    for split, path in (("train", TRAIN), ("val", VAL)):
        memes = read_manifest(path).memes
        feats = fx.text_features("caption", [m.caption for m in memes])
        x = np.stack([f.pooled.astype(np.float32) if f is not None else np.zeros(768, np.float32) for f in feats])
        data[split] = (x, memes)
    (xt, mt), (xv, mv) = data["train"], data["val"]
    for task in ("harmful", "harmfulness"):
        yt = np.array([m.labels[task] for m in mt])
        yv = np.array([m.labels[task] for m in mv])
        clf = LogisticRegression(class_weight="balanced", max_iter=2000, C=1.0).fit(xt, yt)
        pred, prob = clf.predict(xv), clf.predict_proba(xv)
        out[f"{task}_acc"] = accuracy_score(yv, pred)
        out[f"{task}_macro_f1"] = f1_score(yv, pred, average="macro")
        if task == "harmful":
            out["harmful_auroc"] = roc_auc_score(yv, prob[:, 1])
    return {"variant": "floor: logistic regression, mpnet caption", **{k: round(v, 4) for k, v in out.items()}}


def summarize(rows: list[dict], variants: list[str]) -> list[dict]:
    """Per variant: the seeds, mean and sample std of every metric, and the mean fit time."""
    summary = []
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        keys = [k for k in rs[0] if k.startswith(("harmful", "harmfulness", "target"))]
        summary.append({"variant": v, "seeds": [r["seed"] for r in rs], **mean_std(rs, keys),
                        "fit_seconds_mean": round(float(np.mean([r["fit_seconds"] for r in rs])), 1)})
    return summary


def time_features(n: int = 200) -> dict:
    """Cold-cache feature extraction, seconds per meme, for the default encoders (models loaded first)."""
    from dhumor.cache import StageCache
    from dhumor.data.readers import read_manifest
    from dhumor.encoders.features import FeatureExtractor

    memes = read_manifest(TRAIN).memes[:n]
    with tempfile.TemporaryDirectory() as tmp:
        fx = FeatureExtractor({"image": "efficientnet-lite0", "caption": "all-mpnet-base-v2"},
                              StageCache(Path(tmp) / "c.sqlite"), progress=False)
        fx.module("image"), fx.module("caption")
        t = time.perf_counter()
        fx.extract(memes, ["image"])
        t_img = time.perf_counter() - t
        t = time.perf_counter()
        fx.extract(memes, ["caption"])
        t_cap = time.perf_counter() - t
    return {"memes": n, "image_seconds_per_meme": round(t_img / n, 4), "caption_seconds_per_meme": round(t_cap / n, 4)}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--data", default=None, help="Harm-C folder with train.jsonl, val.jsonl, images/ "
                                                 "(default $DHUMOR_DATA, else data/harmeme-c)")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--root", default=str(ROOT / "runs" / "results"))
    ap.add_argument("--out", default=str(results_path("harmeme_val")))
    ap.add_argument("--skip-floor", action="store_true")
    ap.add_argument("--skip-timing", action="store_true")
    ap.add_argument("--resummarize", action="store_true",
                    help="only recompute --out's summary from the per-seed runs it keeps (no training)")
    ap.add_argument("extra", nargs="*", help="extra `dhumor fit` arguments for every run")
    args = ap.parse_args(argv)
    if args.resummarize:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"], [s["variant"] for s in result["summary"]])
        result["summary_recomputed_by"] = "python bench/harmeme_results.py --resummarize"
        atomic_write(args.out, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
        return
    rec = Recorder("harmeme_val")
    refuse_subset_over_default(ap, args.out, results_path("harmeme_val"), [
        f for f, on in (("--variants", args.variants != list(VARIANTS)), ("--seeds", args.seeds != [0, 1, 2]),
                        ("--skip-floor", args.skip_floor), ("--skip-timing", args.skip_timing),
                        ("extra fit arguments", bool(args.extra))) if on])
    global TRAIN, VAL
    TRAIN, VAL = resolve_data_path("train.jsonl", args.data), resolve_data_path("val.jsonl", args.data)
    if not VAL.exists():
        from dhumor.paths import get_data_hint

        ap.error(f"{VAL}: not found; {get_data_hint(args.data)}")
    quiet()
    rows = []
    for v in args.variants:
        for s in args.seeds:
            r = run_variant(v, VARIANTS[v], s, Path(args.root), args.extra)
            rows.append(r)
            print(json.dumps({k: v for k, v in r.items() if k != "metrics"}), flush=True)
    summary = summarize(rows, args.variants)
    for s in summary:
        print(json.dumps(s), flush=True)
    result = {"runs": rows, "summary": summary}
    if not args.skip_floor:
        result["floor"] = logistic_floor()
        print(json.dumps(result["floor"]), flush=True)
    if not args.skip_timing:
        result["feature_timing"] = time_features()
        print(json.dumps(result["feature_timing"]), flush=True)
    rec.write({"std": "sample (ddof=1) over seeds", **result}, args.out)


if __name__ == "__main__":
    main()
