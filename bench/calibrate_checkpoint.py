"""Give a checkpoint exported before `dhumor fit` calibrated its exports what fit now adds after
training: a temperature per task and threshold presets chosen on the calibrated probabilities,
both fitted on the held-out split of train the checkpoint was selected on. The weights are not
touched. The split is rebuilt from the checkpoint's recorded config (train manifest,
``val_fraction``, ``split_seed``; data under ``--data``, ``$DHUMOR_DATA`` or data/harmeme-c), scored
with the checkpoint, and calibrated by the same function as ``ExportBestCheckpoint``.

    DHUMOR_DATA=/path/to/harmeme-c python bench/calibrate_checkpoint.py checkpoints/harmeme-tcrnet --out DIR
    python bench/ship_checkpoint.py DIR --out checkpoints/harmeme-tcrnet   # val metrics, measured once
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dhumor.model.checkpoint import read_checkpoint, write_checkpoint
from dhumor.data.datamodule import split_train_val
from dhumor.data.readers import read_manifest
from dhumor.errors import DataError
from dhumor.inference.items import Item
from dhumor.model.calibration import fit_calibration
from dhumor.paths import resolve_data_path
from dhumor.inference.pipeline import Pipeline
from dhumor.schema import get_schema


def selection_split(meta: dict, data: str | None, primary: str) -> tuple[list, str]:
    """The memes of train the checkpoint was selected on, and a description of that split."""
    cfg = meta["config"]["data"]
    if cfg.get("val"):
        raise SystemExit("this checkpoint was selected on a separate val manifest; calibrate on that with fit")
    try:
        train = read_manifest(resolve_data_path(cfg["train"], data or cfg.get("root"))).memes
    except DataError as e:  # the data is elsewhere: say where it was looked for and how to point at it
        raise SystemExit(f"{e} (the train manifest the checkpoint was trained on; pass --data DIR or set DHUMOR_DATA)")
    _, held_out = split_train_val(train, cfg["val_fraction"], cfg["split_seed"], primary)
    return held_out, f"held-out {cfg['val_fraction']:.0%} of train (split_seed {cfg['split_seed']})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--out", required=True, help="where to write the calibrated checkpoint (may be the same folder)")
    ap.add_argument("--data", default=None, help="Harm-C folder (default $DHUMOR_DATA, else data/harmeme-c)")
    args = ap.parse_args(argv)
    meta, state = read_checkpoint(args.checkpoint)
    if meta.get("calibration"):
        raise SystemExit(f"{args.checkpoint} is calibrated already: {meta['calibration']}")
    schema = get_schema(meta["schema"])
    memes, split = selection_split(meta, args.data, schema.primary)  # the data is found before a model loads
    pipe = Pipeline.from_checkpoint(args.checkpoint)
    prepared = [pipe.preprocess(Item(m.id, m.image, m.caption or "")) for m in memes]
    if bad := [p for p in prepared if p.error]:
        raise SystemExit(f"{bad[0].item.path}: {bad[0].error}")
    probs = pipe.forward(prepared)  # uncalibrated: log p differs from the logits by a per-row constant,
    logits = {t: np.log(np.clip(p, 1e-12, 1.0)) for t, p in probs.items()}  # which temperature scaling ignores
    labels = {t.name: np.array([m.labels[t.name] for m in memes]) for t in schema.tasks}
    meta["calibration"], meta["thresholds"] = fit_calibration(schema, logits, labels)
    n = int((labels[schema.primary] >= 0).sum())
    meta["metrics"] = {**meta["metrics"], "calibration_split": {"split": split, "n": n}}
    stats = (meta.get("ood") or {}).get("file")  # the unfamiliarity statistics travel with the weights
    extra = {stats: (Path(args.checkpoint) / stats).read_bytes()} if stats else None
    write_checkpoint(state, meta, args.out, extra_files=extra)
    print(json.dumps({"split": split, "n": n, "calibration": meta["calibration"], "thresholds": meta["thresholds"]}))


if __name__ == "__main__":
    main()
