"""Does the review loop pay? A simulated moderator, played by Harm-C train's labels.

For each seed: a head is trained (`dhumor fit`) on a seeded 500 memes of Harm-C train. Then, per
ordering (``uncertain`` = probability nearest the threshold first, ``random``, and with
``--orderings ... unfamiliar`` most unfamiliar first), rounds of review:
the current checkpoint scores the rest of train, the queue orders it, the "moderator" records the
dataset's labels as verdicts for the next memes in that order (through the real review queue and
log), the verdicts are exported (`dhumor reviews export`'s code) and the head is retrained from the
previous checkpoint (``model.init_from``) on the 500 plus everything reviewed (``data.extra``).
Harmful macro-F1 and AUROC on Harm-C val (reporting only) after each round.

    DHUMOR_DATA=/path/to/harmeme-c nice -n 10 python bench/review_loop.py --seeds 0 1 2

Writes bench/results/review_loop.json and .md, and docs/review_loop.png.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from harmeme_results import quiet  # noqa: E402
from record import Recorder, as_reported, results_path  # noqa: E402

from dhumor.util.files import atomic_write  # noqa: E402

ORDERINGS = ("uncertain", "random")  # the default arms; "unfamiliar" is a third (--orderings)


def fit(run_dir: Path, seed: int, train: Path, images: Path, extra: Path | None, init_from: Path | None,
        max_epochs: int, patience: int) -> tuple[Path, float]:
    """`dhumor fit` (in-process) with configs/harmeme.yaml's model; the export and the fit's wall seconds."""
    from dhumor.cli import main

    args = ["fit", "--config", str(ROOT / "configs" / "harmeme.yaml"), "--seed_everything", str(seed),
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", str(max_epochs), "--early_stopping.patience", str(patience),
            "--data.progress", "false", "--data.train", str(train),
            "--data.test", "null", "--data.images", str(images), "--data.split_seed", str(seed)]
    if extra is not None:
        args += ["--data.extra", str(extra)]
    if init_from is not None:
        args += ["--model.init_from", str(init_from)]
    t0 = time.perf_counter()
    assert main(args) == 0
    return max(run_dir.rglob("export"), key=lambda p: p.stat().st_mtime), time.perf_counter() - t0


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def score_rows(pipe, memes, shas: dict) -> list[dict]:
    """Result rows (as `dhumor score` writes them) of ``memes`` under the pipeline's checkpoint."""
    from dhumor.inference.items import Item

    items = [Item(m.id, m.image, m.caption or "") for m in memes]
    return [r for batch in pipe.run(items, batch_size=64) for r in batch if not r["error"]]


def moderator_labels(schema, meme) -> dict:
    """The dataset's labels, as the verdict a moderator would give."""
    return {t.name: (t.classes[meme.labels[t.name]] if meme.labels[t.name] >= 0 else None) for t in schema.tasks}


def run_seed(seed: int, budgets: list[int], n_init: int, work: Path, max_epochs: int, patience: int,
             orderings=ORDERINGS) -> list[dict]:
    from dhumor.model.loading import load_module
    from dhumor.data.readers import read_manifest
    from dhumor.inference.evaluation import evaluate
    from dhumor.paths import data_root
    from dhumor.inference.pipeline import Pipeline, load_ood
    from dhumor.review.export import export_reviews
    from dhumor.review.log import ReviewLog
    from dhumor.review.queue import ReviewQueue

    root = data_root()
    train_path, val_path, images = root / "train.jsonl", root / "val.jsonl", root / "images"
    lines = [ln for ln in train_path.read_text().splitlines() if ln.strip()]
    memes = read_manifest(train_path).memes
    assert len(lines) == len(memes)
    perm = np.random.default_rng(seed).permutation(len(memes))
    init_idx, pool_idx = perm[:n_init], perm[n_init:]
    init_manifest = work / f"seed{seed}" / "init.jsonl"
    init_manifest.parent.mkdir(parents=True, exist_ok=True)
    init_manifest.write_text("".join(lines[i] + "\n" for i in sorted(init_idx)))
    pool = [memes[i] for i in pool_idx]
    shas = {m.id: sha256_file(m.image) for m in pool}
    by_sha = {shas[m.id]: m for m in pool}

    encoders: list = []  # one set of frozen encoders for every checkpoint (they share them)

    def pipeline(export: Path) -> Pipeline:
        if not encoders:
            encoders.append(Pipeline.from_checkpoint(export).extractor)
        module = load_module(export)
        return Pipeline(module, encoders[0], checkpoint=str(export),  # its calibration, presets, unfamiliarity
                        ood=load_ood(export, module.checkpoint_meta))

    def val_metrics(export: Path) -> dict:
        m, _ = evaluate(pipeline(export), val_path)
        return {"harmful_macro_f1": round(m["harmful"]["macro_f1"], 4), "harmful_auroc": round(m["harmful"]["auroc"], 4)}

    base, secs = fit(work / f"seed{seed}" / "init", seed, init_manifest, images, None, None, max_epochs, patience)
    out = [{"seed": seed, "ordering": o, "reviewed": 0, "fit_seconds": round(secs, 1), **val_metrics(base)}
           for o in orderings]
    print(json.dumps(out[0]), flush=True)
    for ordering in orderings:
        log = ReviewLog(work / f"seed{seed}" / f"{ordering}.sqlite")
        ckpt = base
        for budget in budgets:
            pipe = pipeline(ckpt)
            queue = ReviewQueue(score_rows(pipe, pool, shas), f"harmc-train-pool-seed{seed}", log, pipe.schema,
                                order=ordering, seed=seed)
            # a budget counts distinct images: Harm-C train holds a few byte-identical memes, reviewed once
            while len(log.reviewed_shas("simulated")) < budget:
                row = queue.next_item("simulated")
                queue.record(row, moderator_labels(pipe.schema, by_sha[row["sha256"]]), "simulated")
            reviewed = work / f"seed{seed}" / f"{ordering}-{budget}.jsonl"
            rep = export_reviews(log, reviewed)
            assert rep.written == budget, rep.to_dict()
            ckpt, secs = fit(work / f"seed{seed}" / f"{ordering}-{budget}", seed, init_manifest, images, reviewed,
                             ckpt, max_epochs, patience)
            r = {"seed": seed, "ordering": ordering, "reviewed": budget, "fit_seconds": round(secs, 1),
                 "train_memes": n_init + budget, **val_metrics(ckpt)}
            out.append(r)
            print(json.dumps(r), flush=True)
    return out


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for o in dict.fromkeys(r["ordering"] for r in rows):
        for n in sorted({r["reviewed"] for r in rows}):
            rs = [r for r in rows if r["ordering"] == o and r["reviewed"] == n]
            s = {"ordering": o, "reviewed": n, "seeds": [r["seed"] for r in rs]}
            for k in ("harmful_macro_f1", "harmful_auroc", "fit_seconds"):
                v = np.array([r[k] for r in rs], dtype=float)
                s[k] = [round(float(v.mean()), 4), round(float(v.std(ddof=1)), 4) if len(v) > 1 else None]
            out.append(s)
    return out


def markdown(summary: list[dict], machine: str) -> str:
    seeds = summary[0]["seeds"]
    spread = f"mean ± sample std over seeds {seeds}" if len(seeds) > 1 else f"one seed ({seeds[0]}), no spread"
    lines = [f"Harm-C val (177 memes), {spread}; {machine}.", "",
             "| reviewed | uncertain-first macro-F1 | random macro-F1 | uncertain-first AUROC | random AUROC "
             "| retrain s (uncertain / random) |", "|---|---|---|---|---|---|"]
    by = {(s["ordering"], s["reviewed"]): s for s in summary}
    f = lambda v: f"{v[0]:.3f}" + ("" if v[1] is None else f" ± {v[1]:.3f}")  # noqa: E731
    if ("unfamiliar", 0) in by:
        lines[2:4] = ["| reviewed | uncertain-first macro-F1 | random macro-F1 | unfamiliar-first macro-F1 "
                      "| uncertain-first AUROC | random AUROC | unfamiliar-first AUROC |", "|---|---|---|---|---|---|---|"]
        for n in sorted({s["reviewed"] for s in summary}):
            u, r, w = by[("uncertain", n)], by[("random", n)], by[("unfamiliar", n)]
            lines.append(f"| {n} | {f(u['harmful_macro_f1'])} | {f(r['harmful_macro_f1'])} | "
                         f"{f(w['harmful_macro_f1'])} | {f(u['harmful_auroc'])} | {f(r['harmful_auroc'])} | "
                         f"{f(w['harmful_auroc'])} |")
        return "\n".join(lines) + "\n"
    for n in sorted({s["reviewed"] for s in summary}):
        u, r = by[("uncertain", n)], by[("random", n)]
        lines.append(f"| {n} | {f(u['harmful_macro_f1'])} | {f(r['harmful_macro_f1'])} | {f(u['harmful_auroc'])} "
                     f"| {f(r['harmful_auroc'])} | {u['fit_seconds'][0]:.1f} / {r['fit_seconds'][0]:.1f} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "harmful_macro_f1", "harmful macro-F1"), (axes[1], "harmful_auroc", "harmful AUROC")):
        for o, style in zip(dict.fromkeys(s["ordering"] for s in summary), ("o-", "s--", "^:")):
            ss = [s for s in summary if s["ordering"] == o]
            x = [s["reviewed"] for s in ss]
            m = np.array([s[key][0] for s in ss])
            e = np.array([s[key][1] or 0.0 for s in ss])  # one seed: no band
            ax.plot(x, m, style, label=f"{o}-first" if o == "uncertain" else o)
            ax.fill_between(x, m - e, m + e, alpha=0.2)
        ax.set_xscale("symlog", linthresh=50)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("memes reviewed (on top of 500 seeded train memes)")
        ax.set_title(f"{title} on Harm-C val")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--budgets", type=int, nargs="+", default=[50, 100, 200, 400, 800],
                    help="cumulative memes reviewed after each round")
    ap.add_argument("--init", type=int, default=500, help="seeded train memes of the starting head")
    ap.add_argument("--orderings", nargs="+", default=list(ORDERINGS), choices=["uncertain", "random", "unfamiliar"],
                    help="queue orders compared (the table with unfamiliar needs all three)")
    ap.add_argument("--max-epochs", type=int, default=20)
    ap.add_argument("--patience", type=int, default=5, help="early stopping on val macro-F1 of the 10%% split")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core CPU)")
    ap.add_argument("--out", default=str(results_path("review_loop")))
    ap.add_argument("--plot", default=None, help="default docs/review_loop.png for the default --out, "
                                                 "else --out with .png")
    ap.add_argument("--report-only", action="store_true", help="only redo the table and plot from --out's JSON")
    args = ap.parse_args(argv)
    if args.plot is None:  # another --out never replaces the published plot
        default = Path(args.out).resolve() == results_path("review_loop").resolve()
        args.plot = str(ROOT / "docs" / "review_loop.png") if default else str(Path(args.out).with_suffix(".png"))
    if args.report_only:
        result = json.loads(Path(args.out).read_text())
        result["summary"] = summarize(result["runs"])  # recomputed from the kept runs (one std convention)
        atomic_write(args.out, json.dumps(result, indent=1) + "\n")
        machine = as_reported(result, "machine")
        report(result["summary"], machine if isinstance(machine, str) else f"{machine['arch']} CPU, "
               f"{machine['cores']} cores", Path(args.out), Path(args.plot))
        return
    quiet()
    import torch

    torch.set_num_threads(args.threads)
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU"
    rec = Recorder("review_loop")
    t0 = time.perf_counter()
    rows = []
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="dhumor-review-loop-") as tmp:
        for s in args.seeds:
            rows += run_seed(s, sorted(args.budgets), args.init, Path(tmp), args.max_epochs, args.patience,
                             tuple(args.orderings))
            summary = summarize(rows)
            result = {"machine": machine, "seeds": sorted({r["seed"] for r in rows}), "init": args.init,
                      "budgets": args.budgets, "max_epochs": args.max_epochs, "patience": args.patience,
                      "torch_threads": args.threads, "runs": rows, "summary": summary,
                      "wall_seconds": round(time.perf_counter() - t0, 1)}
            rec.write(result, out)  # after every seed: a partial run still reports
    report(summary, machine, out, Path(args.plot))


def report(summary: list[dict], machine: str, out: Path, png: Path) -> None:
    atomic_write(out.with_suffix(".md"), markdown(summary, machine))
    plot(summary, png)
    print(markdown(summary, machine))


if __name__ == "__main__":
    main()
