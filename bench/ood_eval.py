"""How well does the unfamiliarity score know what the model never learned? Measured on Harm-C.

Fitting and choosing use no out-of-domain data and no val labels:
- every method's reference statistics come from the checkpoint's training split (train minus the
  held-out 10% selection split), its threshold from the held-out split (5% called unfamiliar);
- the method is chosen by its mean AUROC separating the held-out split from constructed shifts built
  on held-out images (caption swap) and on pictures no meme set holds (synthetic memes, photographs).
Reported on Harm-C val (177 memes): the share called unfamiliar, AUROC against the same shifts built
on val images, and the risk-coverage of harmful macro-F1 abstaining on the least confident or the
most unfamiliar memes (val labels used only there, for reporting). Shifts:
- ``caption_swap``: the memes' images with captions on unrelated topics (sports, cooking, weather ...);
- ``synthetic``: generated memes (dhumor.data.synthetic: captions rendered on noise and sample pictures);
- ``photos``: scikit-image's bundled photographs and random crops of them, no text.
Latency (ms per meme the score adds, measured beside the model forward in one run) and the bytes the
statistics add. Writes bench/results/ood.json.

    DHUMOR_DATA=/path/to/harmeme-c nice -n 10 python bench/ood_eval.py [--checkpoint DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parent))
from add_ood_stats import embed, train_and_held_out  # noqa: E402
from record import Recorder, results_path  # noqa: E402

from dhumor.model.checkpoint import read_meta  # noqa: E402
from dhumor.data.readers import read_manifest  # noqa: E402
from dhumor.data.synthetic import render_meme, sample_image, write_fixture  # noqa: E402
from dhumor.inference.items import Item  # noqa: E402
from dhumor.model.ood import DEFAULT_K, METHODS, UNFAMILIAR_SHARE, OODScorer  # noqa: E402
from dhumor.paths import data_root  # noqa: E402
from dhumor.inference.pipeline import Pipeline  # noqa: E402
from dhumor.resources import EXAMPLES_DIR, default_checkpoint  # noqa: E402
from dhumor.schema import Meme  # noqa: E402
from dhumor.util.files import atomic_write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Written for this benchmark: everyday topics that no COVID-19 meme is about.
UNRELATED = [
    "the striker scored twice in the second half and the home crowd went wild",
    "add the onions to the pan and cook them slowly until golden",
    "tomorrow will be sunny in the morning with light rain after lunch",
    "the marathon route passes the old harbour before the finish line",
    "whisk the eggs with sugar until the mixture is pale and fluffy",
    "a cold front brings strong winds and snow to the mountains tonight",
    "the goalkeeper saved a penalty in the last minute of extra time",
    "bake the bread for forty minutes until the crust sounds hollow",
    "expect fog on the coast early and clear skies by the afternoon",
    "the tennis final went to five sets under the evening lights",
    "season the soup with salt pepper and a squeeze of lemon",
    "humidity rises this weekend and thunderstorms are likely on sunday",
    "our cycling club rides forty kilometres every saturday morning",
    "slice the tomatoes thinly and layer them with fresh basil",
    "the heatwave ends on thursday when temperatures drop by ten degrees",
    "the basketball team won their fourth game in a row last night",
    "let the dough rest in the fridge overnight before rolling it out",
    "autumn leaves are falling early this year after a dry summer",
    "the swimmer broke the national record in the butterfly event",
    "roast the vegetables with olive oil garlic and rosemary",
    "a rainbow appeared over the valley after the afternoon shower",
    "the chess tournament ended in a draw after six hours of play",
    "my grandmother's apple pie recipe uses cinnamon and brown sugar",
    "frost is expected overnight so cover the tender plants in the garden",
    "the rowing crew trained on the river at sunrise all week",
    "simmer the tomato sauce for an hour to deepen the flavour",
    "the sailing race was postponed because the wind was too light",
    "golf lessons for beginners start at the club next month",
    "grill the corn until the kernels are charred and sweet",
    "meteorologists are tracking a tropical storm far out at sea",
]
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "cat", "coins", "moon", "hubble_deep_field",
          "immunohistochemistry", "retina", "brick", "grass", "gravel", "colorwheel", "motorcycle_left",
          "logo", "microaneurysms", "page"]
COVERAGES = [round(c, 2) for c in np.arange(1.0, 0.499, -0.05)]


def photo_memes(out: Path, crops: int = 4, seed: int = 0) -> list[Meme]:
    """scikit-image's photographs, whole and ``crops`` random crops each, without text."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    memes = []
    for name in PHOTOS:
        try:
            img = sample_image(name)
        except Exception:  # a picture this scikit-image version lacks (or needs a download for)
            continue
        pics = [img]
        for _ in range(crops):
            w, h = img.size
            cw, ch = int(w * rng.uniform(0.3, 0.7)), int(h * rng.uniform(0.3, 0.7))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            pics.append(img.crop((x, y, x + cw, y + ch)))
        for i, p in enumerate(pics):
            path = out / f"{name}_{i}.png"
            p.convert("RGB").save(path)
            memes.append(Meme(id=path.stem, image=path, caption=""))
    return memes


EXAMPLE_CAPTIONS = {
    "astronaut": "me explaining my weekend plans to my houseplants",
    "chelsea": "when the vet says it's just a small procedure",
    "coffee": "coffee is just anxiety in a cup",
    "rocket": "elon when the rocket explodes again",
    "camera": "photographers be like one more shot",
    "horse": "when you bet everything on the wrong horse",
}


def synthetic_memes(out: Path, n: int = 80) -> list[Meme]:
    """Generated memes: the fixture generator's captioned noise pictures, the example memes, and
    sample photographs with unrelated captions in meme layout."""
    memes = read_manifest(write_fixture(out / "fixture", n=n, seed=7, fmt="harmeme")).memes
    for name, caption in EXAMPLE_CAPTIONS.items():  # the shipped example memes, captions as rendered on them
        memes.append(Meme(id=name, image=EXAMPLES_DIR / f"{name}.jpg", caption=caption))
    (out / "captioned").mkdir(exist_ok=True)
    for i, name in enumerate(PHOTOS[:12]):
        try:
            img = sample_image(name)
        except Exception:
            continue
        text = UNRELATED[i % len(UNRELATED)]
        words = text.split()
        path = out / "captioned" / f"{name}.jpg"
        render_meme(img, " ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])).save(path)
        memes.append(Meme(id=f"cap_{name}", image=path, caption=text))
    return memes


def macro_f1(y: np.ndarray, p: np.ndarray, th: float) -> float:
    return float(f1_score(y, p >= th, average="macro", zero_division=0))


def risk_coverage(y: np.ndarray, p: np.ndarray, th: float, abstain_first: np.ndarray) -> dict:
    """Harmful macro-F1 on the memes kept when abstaining, at each coverage, on those with the highest
    ``abstain_first``; area = mean macro-F1 over the coverage grid (1.0 .. 0.5)."""
    order = np.argsort(-abstain_first, kind="stable")  # abstain on these first
    curve = {}
    for c in COVERAGES:
        keep = np.sort(order[len(y) - int(round(c * len(y))):])
        curve[str(c)] = round(macro_f1(y[keep], p[keep], th), 4)
    return {"curve": curve, "area": round(float(np.mean(list(curve.values()))), 4), "at_0.8": curve["0.8"]}



def markdown(r: dict) -> str:
    """The tables of docs/unfamiliar.md from the result JSON."""
    shifts = list(r["shift_sizes"])
    lines = [f"Shipped checkpoint; statistics from {r['split_fit']}, threshold from {r['split_threshold']}; "
             f"reported on Harm-C val ({r['val_n']} memes). {r['machine']}.", "",
             "| method | bytes | val share unfamiliar (target 5%) | "
             + " | ".join(f"AUROC {s} (n={r['shift_sizes'][s]})" for s in shifts)
             + " | selection mean AUROC (held-out side) |", "|---" * (4 + len(shifts)) + "|"]
    for m, v in r["methods"].items():
        mark = " (chosen)" if m == r["chosen"] else ""
        lines.append(f"| `{m}`{mark} | {v['bytes']:,} | {v['val_share_unfamiliar']:.1%} | "
                     + " | ".join(f"{v['val_auroc'][s]['auroc']:.3f}" for s in shifts)
                     + f" | {v['selection_mean_auroc']:.3f} |")
    rc = r["risk_coverage"]
    lines += ["", f"Risk–coverage of harmful macro-F1 on val at the balanced threshold ({r['decision_threshold']}); "
              f"full coverage {rc['full_coverage_macro_f1']:.3f}. Area = mean macro-F1 over coverage 100%..50% in "
              f"steps of 5%.", "", "| abstain first on | area | macro-F1 at 80% coverage | at 90% | at 70% |",
              "|---|---|---|---|---|"]
    for k in ("least_confident", "most_unfamiliar"):
        c = rc[k]
        lines.append(f"| {k.replace('_', ' ')} | {c['area']:.3f} | {c['at_0.8']:.3f} | {c['curve']['0.9']:.3f} | "
                     f"{c['curve']['0.7']:.3f} |")
    lat = r["latency_ms_per_meme"]
    lines += ["", f"Latency the chosen score adds: {lat['added_batch64']:.3f} ms per meme in batches of 64 (model "
              f"step {lat['model_forward_batch64']:.3f} → {lat['model_forward_plus_score_batch64']:.3f} ms), "
              f"{lat['added_single']:.3f} ms for a single meme ({lat['model_forward_single']:.3f} → "
              f"{lat['model_forward_plus_score_single']:.3f} ms); medians of 40 interleaved runs; the encoders (not counted) take tens of ms per "
              f"meme on this CPU. Checkpoint size: model.safetensors "
              f"{r['checkpoint_bytes']['model.safetensors']:,} bytes, ood.safetensors "
              f"{r['checkpoint_bytes']['ood.safetensors (chosen)']:,} bytes."]
    return "\n".join(lines) + "\n"


def paired(fa, fb, repeat: int = 40) -> tuple[float, float]:
    """Median seconds of ``fa`` and of ``fb``, run alternately."""
    ta, tb = [], []
    for _ in range(repeat):
        for f, acc in ((fa, ta), (fb, tb)):
            t = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t)
    return float(np.median(ta)), float(np.median(tb))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", default=None, help="default: the shipped checkpoint")
    ap.add_argument("--data", default=None)
    ap.add_argument("--out", default=str(results_path("ood")))
    args = ap.parse_args(argv)
    rec = Recorder("ood")
    ckpt = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    meta = read_meta(ckpt)
    primary = meta["schema"]["primary"]
    t0 = time.perf_counter()
    fit_part, held, split = train_and_held_out(meta, args.data, primary)
    val = read_manifest(data_root(args.data) / "val.jsonl").memes
    pipe = Pipeline.from_checkpoint(ckpt)
    shipped = pipe.ood
    pipe.ood = None
    _, train_emb = embed(pipe, fit_part)
    _, held_emb = embed(pipe, held)
    val_probs, val_emb = embed(pipe, val)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shifts_report = {
            "caption_swap": embed(pipe, val, [UNRELATED[i % len(UNRELATED)] for i in range(len(val))])[1],
            "synthetic": embed(pipe, synthetic_memes(tmp / "syn"))[1],
            "photos": embed(pipe, photo_memes(tmp / "photos"))[1],
        }
        shifts_select = dict(shifts_report)
        shifts_select["caption_swap"] = embed(pipe, held, [UNRELATED[(i + 7) % len(UNRELATED)]
                                                           for i in range(len(held))])[1]
    print(f"embeddings in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    th = pipe.decider.threshold
    y = np.array([m.labels[primary] for m in val])
    p = val_probs[primary][:, 1]
    methods = {}
    for method in METHODS:
        s = OODScorer.fit(method, train_emb, DEFAULT_K)
        s.set_threshold(held_emb, UNFAMILIAR_SHARE, split)
        held_s, val_s = s.score(held_emb), s.score(val_emb)
        sel = {k: round(float(roc_auc_score(np.r_[np.zeros(len(held_s)), np.ones(len(e))],
                                            np.r_[held_s, s.score(e)])), 4) for k, e in shifts_select.items()}
        rep = {}
        for k, e in shifts_report.items():
            sc = s.score(e)
            rep[k] = {"auroc": round(float(roc_auc_score(np.r_[np.zeros(len(val_s)), np.ones(len(sc))],
                                                         np.r_[val_s, sc])), 4),
                      "share_unfamiliar": round(float((sc > s.threshold).mean()), 4), "n": len(sc)}
        nbytes = len(s.to_bytes()) if s.tensors else 0
        one = val_emb.take(slice(0, 1))
        methods[method] = {
            "k": s.k if method.startswith("knn") else None, "threshold": round(s.threshold, 6), "bytes": nbytes,
            "selection_auroc_held_out": sel, "selection_mean_auroc": round(float(np.mean(list(sel.values()))), 4),
            "val_share_unfamiliar": round(float((val_s > s.threshold).mean()), 4),
            "val_auroc": rep,
            "risk_coverage_most_unfamiliar": risk_coverage(y, p, th, val_s),
            "ms_per_meme_batch": round(1000 * paired(lambda: s.score(val_emb), lambda: None, 10)[0] / len(val_emb), 4),
            "ms_per_meme_single": round(1000 * paired(lambda: s.score(one), lambda: None, 20)[0], 4),
        }
        print(method, json.dumps({k: methods[method][k] for k in ("selection_mean_auroc", "val_share_unfamiliar")}),
              {k: v["auroc"] for k, v in rep.items()}, file=sys.stderr)
    chosen = max(methods, key=lambda m: methods[m]["selection_mean_auroc"])
    conf = -np.abs(p - th)  # least confident first
    rc = {"full_coverage_macro_f1": round(macro_f1(y, p, th), 4),
          "least_confident": risk_coverage(y, p, th, conf),
          "most_unfamiliar": methods[chosen]["risk_coverage_most_unfamiliar"],
          "random_expectation": "macro-F1 of a random subset equals full coverage in expectation"}
    # What the score adds to a meme's model step: the model forward on cached features, with and
    # without the chosen score, measured here one after the other.
    prepared_feats = pipe.features([pipe.preprocess(Item(m.id, m.image, m.caption or "")) for m in val[:64]])
    scorer = OODScorer.fit(chosen, train_emb, DEFAULT_K)
    pipe.ood = None
    # Interleaved and the median of many: the machine is shared, and a burst of other work must not
    # land on one arm only.
    base, withs = paired(lambda: (setattr(pipe, "ood", None), pipe.score_features(prepared_feats)),
                         lambda: (setattr(pipe, "ood", scorer), pipe.score_features(prepared_feats)))
    base, withs = base / 64, withs / 64
    single_base, single_with = paired(lambda: (setattr(pipe, "ood", None), pipe.score_features(prepared_feats[:1])),
                                      lambda: (setattr(pipe, "ood", scorer), pipe.score_features(prepared_feats[:1])))
    out = {
        "checkpoint": str(ckpt.name), "machine": f"{platform.machine()} {os.cpu_count()} CPUs (2 cores shared with "
                                                  f"other agents' work at the time)",
        "split_fit": f"train minus held-out (n={len(train_emb)})", "split_threshold": f"{split} (n={len(held_emb)})",
        "val_n": len(val), "target_share_unfamiliar": UNFAMILIAR_SHARE, "decision_threshold": th,
        "shift_sizes": {k: len(v) for k, v in shifts_report.items()},
        "selection_rule": "highest mean AUROC, held-out split vs shifts built on held-out images (no val, no labels)",
        "chosen": chosen, "shipped_method": shipped.method if shipped else None,
        "methods": methods, "risk_coverage": rc,
        "latency_ms_per_meme": {"model_forward_batch64": round(1000 * base, 4),
                                "model_forward_plus_score_batch64": round(1000 * withs, 4),
                                "added_batch64": round(1000 * (withs - base), 4),
                                "model_forward_single": round(1000 * single_base, 4),
                                "model_forward_plus_score_single": round(1000 * single_with, 4),
                                "added_single": round(1000 * (single_with - single_base), 4)},
        "checkpoint_bytes": {"model.safetensors": (ckpt / "model.safetensors").stat().st_size,
                             "ood.safetensors (chosen)": methods[chosen]["bytes"]},
    }
    rec.write(out, args.out)
    atomic_write(Path(args.out).with_suffix(".md"), markdown(out))
    print(markdown(out))
    print(json.dumps({"chosen": chosen, "risk_coverage": {k: (v["area"], v["at_0.8"]) if isinstance(v, dict) else v
                                                          for k, v in rc.items()},
                      "latency": out["latency_ms_per_meme"]}), file=sys.stderr)


if __name__ == "__main__":
    main()
