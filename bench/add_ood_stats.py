"""Give a checkpoint exported before `dhumor fit` fitted unfamiliarity statistics what fit now adds
at export, without touching its weights: reference statistics of the training split (train minus
the held-out selection split, rebuilt from the checkpoint's recorded config as
bench/calibrate_checkpoint.py does), the threshold that calls 5% of the held-out split unfamiliar,
and the confidence-abstention preset. The predictions are checked to be unchanged.

    DHUMOR_DATA=/path/to/harmeme-c python bench/add_ood_stats.py dhumor/assets/checkpoints/harmeme-tcrnet \\
        --out dhumor/assets/checkpoints/harmeme-tcrnet [--method knn_streams]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from calibrate_checkpoint import selection_split  # noqa: E402

from dhumor.model.checkpoint import read_checkpoint, write_checkpoint  # noqa: E402
from dhumor.data.datamodule import split_train_val  # noqa: E402
from dhumor.data.readers import read_manifest  # noqa: E402
from dhumor.inference.items import Item  # noqa: E402
from dhumor.model.ood import (DEFAULT_K, DEFAULT_METHOD, METHODS, UNCERTAIN_COVERAGE, UNFAMILIAR_SHARE,  # noqa: E402
                              Embeddings, OODScorer, uncertain_margin)
from dhumor.paths import resolve_data_path  # noqa: E402
from dhumor.inference.pipeline import Pipeline  # noqa: E402
from dhumor.schema import get_schema  # noqa: E402


def train_and_held_out(meta: dict, data: str | None, primary: str) -> tuple[list, list, str]:
    """The training memes (train minus the held-out split) and the held-out selection split."""
    held_out, split = selection_split(meta, data, primary)
    cfg = meta["config"]["data"]
    train = read_manifest(resolve_data_path(cfg["train"], data or cfg.get("root"))).memes
    fit_part, held = split_train_val(train, cfg["val_fraction"], cfg["split_seed"], primary)
    assert [m.id for m in held] == [m.id for m in held_out]
    return fit_part, held, split


def embed(pipe: Pipeline, memes, captions: list[str] | None = None) -> tuple[dict, Embeddings]:
    """Calibrated probabilities and embeddings of memes (their captions, or ``captions`` instead)."""
    caps = captions if captions is not None else [m.caption or "" for m in memes]
    prepared = [pipe.preprocess(Item(m.id, m.image, c)) for m, c in zip(memes, caps)]
    if bad := [p for p in prepared if p.error]:
        raise SystemExit(f"{bad[0].item.path}: {bad[0].error}")
    probs, emb = pipe.embed_features(pipe.features(prepared))
    emb.labels = np.array([m.labels.get(pipe.schema.primary, -1) for m in memes])
    return probs, emb


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True, help="where to write the checkpoint (may be the same folder)")
    ap.add_argument("--data", default=None, help="Harm-C folder (default $DHUMOR_DATA, else data/harmeme-c)")
    ap.add_argument("--method", default=DEFAULT_METHOD, choices=METHODS)
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    args = ap.parse_args(argv)
    meta, state = read_checkpoint(args.checkpoint)
    schema = get_schema(meta["schema"])
    fit_part, held, split = train_and_held_out(meta, args.data, schema.primary)  # data found before a model loads
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    pipe.ood = None  # probabilities only: the statistics are what this fits
    _, train_emb = embed(pipe, fit_part)
    held_probs, held_emb = embed(pipe, held)
    scorer = OODScorer.fit(args.method, train_emb, args.k)
    scorer.info["fitted_on"] = f"train split without the held-out part (n={len(train_emb)})"
    scorer.set_threshold(held_emb, UNFAMILIAR_SHARE, split)
    data = scorer.to_bytes() if scorer.tensors else b""
    meta["ood"] = scorer.meta(len(data))
    th = (meta.get("thresholds") or {}).get("balanced", 0.5)
    meta["abstention"] = {"uncertain_margin": round(uncertain_margin(held_probs[schema.primary][:, 1], th), 6),
                          "coverage": UNCERTAIN_COVERAGE, "fitted_on": split}
    out = write_checkpoint(state, meta, args.out, extra_files={meta["ood"]["file"]: data} if data else None)
    # The weights and every probability are unchanged; only the row's ood and decision fields are new.
    after = Pipeline.from_checkpoint(out)
    _, new_state = read_checkpoint(out)
    assert all(np.array_equal(new_state[k].numpy(), state[k].numpy()) for k in state)
    again, _ = embed(after, held)
    for t in held_probs:
        np.testing.assert_allclose(again[t], held_probs[t], rtol=0, atol=1e-7)
    print(json.dumps({"out": str(out), "ood": meta["ood"], "abstention": meta["abstention"]}))


if __name__ == "__main__":
    main()
