"""Can an ECE target be measured on a split this size? A checkpoint's harmful-task expected
calibration error on a labelled manifest (Harm-C val: 177 memes) with a bootstrap interval, beside
the ECE that a *perfectly calibrated* model shows on the same memes: labels drawn from the model's
own probabilities, so any ECE it reads is binning noise. An observed ECE inside that noise band
cannot be told apart from perfect calibration at this size.

    DHUMOR_DATA=/path/to/harmeme-c python bench/ece_noise.py [--checkpoint DIR] [--manifest val.jsonl]

ECE as in bench/accuracy_search.py (top-label confidence, 15 equal-width bins); the probabilities
are the pipeline's, i.e. after the checkpoint's stored temperature.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from accuracy_search import ece
from harmeme_results import VAL, quiet
from record import Recorder, refuse_subset_over_default, results_path


def primary_probs(checkpoint: str | None, manifest: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(P(classes) of the primary task per scored meme, its gold class index, the class names)."""
    from dhumor.data.readers import read_manifest
    from dhumor.inference.pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(checkpoint)
    task = pipe.schema.task(pipe.schema.primary)
    memes = read_manifest(manifest).memes
    pred = pipe.predict_memes(memes)  # the manifest's captions, the checkpoint's temperature
    return pred.probs[task.name], np.array([memes[i].labels[task.name] for i in pred.kept]), list(task.classes)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--manifest", default=str(VAL))
    ap.add_argument("--draws", type=int, default=2000, help="bootstrap resamples and simulated label sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(results_path("ece_noise")))
    args = ap.parse_args(argv)
    rec = Recorder("ece_noise")
    refuse_subset_over_default(ap, args.out, results_path("ece_noise"), ["--checkpoint"] if args.checkpoint else [])
    quiet()
    probs, labels, classes = primary_probs(args.checkpoint, Path(args.manifest))
    rng = np.random.default_rng(args.seed)
    n = len(labels)
    observed = ece(probs, labels)
    boot = np.array([ece(probs[i], labels[i]) for i in (rng.integers(0, n, n) for _ in range(args.draws))])
    # A perfectly calibrated model: each meme's label drawn from the model's own probabilities.
    cum = probs.cumsum(1)
    perfect = np.array([ece(probs, (rng.random((n, 1)) > cum).sum(1).clip(max=len(classes) - 1))
                        for _ in range(args.draws)])
    out = {"manifest": args.manifest, "memes": n, "classes": classes, "draws": args.draws, "seed": args.seed,
           "ece": round(observed, 4),
           "ece_bootstrap_95": [round(float(q), 4) for q in np.quantile(boot, [0.025, 0.975])],
           "perfectly_calibrated_ece_mean": round(float(perfect.mean()), 4),
           "perfectly_calibrated_ece_95th": round(float(np.quantile(perfect, 0.95)), 4),
           "share_of_perfect_draws_over_0.05": round(float((perfect > 0.05).mean()), 3)}
    print(json.dumps(out, indent=1))
    rec.write(out, args.out)


if __name__ == "__main__":
    main()
