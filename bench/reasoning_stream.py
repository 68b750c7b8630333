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
import tempfile
from pathlib import Path

from harmeme_results import ROOT, TRAIN, VAL, fit, headline, mean_std, quiet
from record import Recorder, results_path

WITH_EXPLANATIONS = ["configs/ablations/with-explanations.yaml"]
VARIANTS = {  # name: (extra configs, extra fit args, explanation iteration; None = no reasoning stream)
    "no reasoning (image+caption)": ([], [], None),
    "reasoning, final of N=3 iterations": (WITH_EXPLANATIONS, [], -1),
    "reasoning, iteration 1 only": (WITH_EXPLANATIONS, ["--data.explanation_iteration", "1"], 1),
}
METRICS = ["harmful_macro_f1", "harmful_auroc", "harmfulness_macro_f1", "target_macro_f1"]


def merged(files: list[str], out: Path) -> set[str]:
    """All explanation rows in one file (the last row per id wins); returns the ids explained ok."""
    rows = {}
    for f in files:
        for line in Path(f).read_text().splitlines():
            if line.strip():
                rows[json.loads(line)["id"]] = line
    out.write_text("".join(line + "\n" for line in rows.values()))
    return {k for k, line in rows.items() if json.loads(line).get("status") == "ok"}


def subset(manifest: Path, ids: set[str], out: Path) -> int:
    """The rows of a HarMeme jsonl whose id is in ``ids``, written to ``out``; returns how many."""
    keep = [l for l in manifest.read_text().splitlines() if l.strip() and json.loads(l)["id"] in ids]
    out.write_text("".join(l + "\n" for l in keep))
    return len(keep)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--explanations", nargs="+", required=True)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--train-on", choices=["all", "explained"], default="all",
                    help="all of Harm-C train, or only its memes that have an explanation")
    ap.add_argument("--root", default=str(ROOT / "runs" / "reasoning"))
    ap.add_argument("--out", default=None, help="default bench/results/reasoning_stream[_explained].json")
    args = ap.parse_args(argv)
    name = "reasoning_stream" + ("_explained" if args.train_on == "explained" else "")
    rec = Recorder(name)
    quiet()
    from dhumor.inference.evaluation import evaluate
    from dhumor.inference.pipeline import Pipeline

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").symlink_to(VAL.parent / "images")  # train and val share the dataset's image folder
        expl = tmp / "explanations.jsonl"
        ok_ids = merged(args.explanations, expl)
        val_sub, train_sub = tmp / "val_explained.jsonl", tmp / "train_explained.jsonl"
        coverage = {"train_explained": subset(TRAIN, ok_ids, train_sub), "val_explained": subset(VAL, ok_ids, val_sub),
                    "train_on": args.train_on}
        print(json.dumps(coverage), flush=True)
        train_args = ["--data.train", str(train_sub)] if args.train_on == "explained" else []
        rows = []
        for name, (configs, extra, iteration) in VARIANTS.items():
            slug = name.split(" (")[0].split(",")[0].replace(" ", "_")
            for seed in args.seeds:
                run = Path(args.root) / args.train_on / f"{slug}-it{iteration}-s{seed}"
                reasoning = ["--data.explanations", str(expl)] if iteration is not None else []
                export, _ = fit(configs, seed, run, [*extra, *train_args, *reasoning])
                pipe = Pipeline.from_checkpoint(export)
                r = {"variant": name, "seed": seed}
                for split, manifest in (("val_explained", val_sub), ("val_all", VAL)):
                    m, _ = evaluate(pipe, manifest, explanations=expl if iteration is not None else None,
                                    explanation_iteration=iteration or -1)
                    r[split] = {k: headline(m)[k] for k in METRICS} | {"n": m["harmful"]["n"]}
                rows.append(r)
                print(json.dumps(r), flush=True)
    summary = []
    for name in VARIANTS:
        rs = [r for r in rows if r["variant"] == name]
        summary.append({"variant": name, **{split: mean_std([r[split] for r in rs], METRICS)
                                            for split in ("val_explained", "val_all")}})
        print(json.dumps(summary[-1]), flush=True)
    rec.write({"std": "sample (ddof=1) over seeds", "coverage": coverage, "runs": rows, "summary": summary},
              args.out or results_path(name))


if __name__ == "__main__":
    main()
