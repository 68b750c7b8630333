"""What the reasoning stream is worth: TCRNet without it, with the loop's final explanation (N
iterations) and with the first explanation only (1 iteration), on Harm-C val.

Explanations come from `dhumor explain` outputs (bench/explain_harmeme.sh); memes without one have
an absent reasoning stream (TCRNet's missing-stream embedding). Each variant is trained through
`dhumor fit` with several seeds and evaluated on (a) the val memes that have an explanation and
(b) all of val. `--train-on explained` trains every variant on the explained part of train only
(a paired comparison on the same memes, for when few of train's memes have explanations).

    python bench/reasoning_stream.py --explanations outputs/explanations/*.jsonl --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
VAL = ROOT.parent / "shared" / "datasets" / "harmeme-c" / "val.jsonl"
TRAIN = VAL.with_name("train.jsonl")
VARIANTS = {  # name: (extra fit args, explanation iteration for evaluation)
    "no reasoning (image+caption)": ([], None),
    "reasoning, final of N=3 iterations": (["--config", "configs/ablations/with-explanations.yaml"], -1),
    "reasoning, iteration 1 only": (["--config", "configs/ablations/with-explanations.yaml",
                                     "--data.explanation_iteration", "1"], 1),
}


def merged(files: list[str], out: Path) -> tuple[Path, set[str]]:
    ok = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                ok[r["id"]] = line
    out.write_text("".join(v + "\n" for v in ok.values()))
    return out, {k for k, v in ok.items() if json.loads(v).get("status") == "ok"}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--explanations", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-on", choices=["all", "explained"], default="all",
                    help="all of Harm-C train, or only its memes that have an explanation")
    ap.add_argument("--root", default=str(ROOT / "runs" / "reasoning"))
    ap.add_argument("--out", default=str(ROOT / "outputs" / "results" / "reasoning_stream.json"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    from dhumor.cli import main as cli
    from dhumor.data.readers import read_manifest
    from dhumor.evaluation import evaluate
    from dhumor.pipeline import Pipeline

    tmp = Path(tempfile.mkdtemp())
    expl, ok_ids = merged(args.explanations, tmp / "explanations.jsonl")
    val_lines = [l for l in VAL.read_text().splitlines() if l.strip()]
    sub = tmp / "val_explained.jsonl"
    sub.write_text("".join(l + "\n" for l in val_lines if json.loads(l)["id"] in ok_ids))
    n_sub = sum(1 for _ in sub.read_text().splitlines())
    train_ids = {m.id for m in read_manifest(TRAIN).memes}
    coverage = {"train_explained": len(ok_ids & train_ids), "val_explained": n_sub, "train_on": args.train_on}
    print(json.dumps(coverage), flush=True)
    (sub.parent / "images").symlink_to(VAL.parent / "images")
    train_args = []
    if args.train_on == "explained":
        train = tmp / "train_explained.jsonl"
        train.write_text("".join(l + "\n" for l in TRAIN.read_text().splitlines()
                                 if l.strip() and json.loads(l)["id"] in ok_ids))
        train_args = ["--data.train", str(train)]
    rows = []
    for name, (extra, iteration) in VARIANTS.items():
        for seed in args.seeds:
            run = Path(args.root) / args.train_on / f"{name.split(' (')[0].split(',')[0].replace(' ', '_')}-it{iteration}-s{seed}"
            argv_ = ["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), *[str(ROOT / a) if a.endswith(".yaml")
                                                                                  else a for a in extra],
                     "--seed_everything", str(seed), "--trainer.default_root_dir", str(run),
                     "--trainer.enable_progress_bar", "false", "--data.progress", "false", *train_args]
            if iteration is not None:
                argv_ += ["--data.explanations", str(expl)]
            assert cli(argv_) == 0
            export = next(run.rglob("export"))
            pipe = Pipeline.from_checkpoint(export)
            r = {"variant": name, "seed": seed}
            for split, manifest in (("val_explained", sub), ("val_all", VAL)):
                m, _ = evaluate(pipe, manifest, explanations=expl if iteration is not None else None,
                                explanation_iteration=iteration or -1)
                r[split] = {"harmful_macro_f1": m["harmful"]["macro_f1"], "harmful_auroc": m["harmful"]["auroc"],
                            "harmfulness_macro_f1": m["harmfulness"]["macro_f1"],
                            "target_macro_f1": m["target"].get("macro_f1"), "n": m["harmful"]["n"]}
            rows.append(r)
            print(json.dumps(r), flush=True)
    summary = []
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        s = {"variant": name}
        for split in ("val_explained", "val_all"):
            s[split] = {k: [round(float(np.mean([r[split][k] for r in rs if r[split][k] is not None])), 4),
                            round(float(np.std([r[split][k] for r in rs if r[split][k] is not None])), 4)]
                        for k in ("harmful_macro_f1", "harmful_auroc", "harmfulness_macro_f1", "target_macro_f1")}
        summary.append(s)
        print(json.dumps(s), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"coverage": coverage, "runs": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
