"""Turn a training run's export into the shipped default: val metrics measured once, the seed summary,
and the model card beside the weights. The threshold presets and temperatures are the ones `dhumor fit`
fitted on the run's own held-out split of train (never on Harm-C val); this script does not change them.

    python bench/ship_checkpoint.py runs/results/TCRNet_caption_image-seed0/lightning_logs/version_0/export \
        --results bench/results/harmeme_val.json --out checkpoints/harmeme-tcrnet [--data /path/to/harmeme-c]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from dhumor.model.checkpoint import read_checkpoint, write_checkpoint
from dhumor.inference.evaluation import evaluate
from dhumor.paths import resolve_data_path
from dhumor.inference.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("export")
    ap.add_argument("--results", default=None, help="harmeme_results.py output, for the seed summary")
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "harmeme-tcrnet"))
    ap.add_argument("--data", default=None, help="Harm-C folder (default $DHUMOR_DATA, else data/harmeme-c)")
    args = ap.parse_args(argv)
    meta, state = read_checkpoint(args.export)
    if not meta.get("thresholds") or not meta.get("calibration"):
        ap.error(f"{args.export}: no fitted thresholds/calibration (exported by an older dhumor); refit it")
    cfg = meta["config"]["data"]
    pipe = Pipeline.from_checkpoint(args.export)
    val_metrics, _ = evaluate(pipe, resolve_data_path(cfg["test"], args.data or cfg.get("root")))
    split = meta["metrics"].get("calibration_split", {})
    meta["metrics"] = {**meta["metrics"], "harmeme_c_val": val_metrics,
                       "threshold_source": f"{split.get('split')}, n={split.get('n')}"}
    if args.results:
        res = json.loads(Path(args.results).read_text())
        meta["metrics"]["seed_summary_harmeme_c_val"] = res["summary"]
    stats = (meta.get("ood") or {}).get("file")  # the unfamiliarity statistics travel with the weights
    write_checkpoint(state, meta, args.out, extra_files={stats: (Path(args.export) / stats).read_bytes()}
                     if stats else None)
    print(json.dumps({"thresholds": meta["thresholds"], "calibration": meta["calibration"],
                      "val": {t: {k: m.get(k) for k in ("accuracy", "macro_f1", "auroc", "n")}
                              for t, m in val_metrics.items()}}, indent=1))


if __name__ == "__main__":
    main()
