"""OCR quality against a manifest's own captions: character and word error rates, seconds per image.

Text is normalised before comparison: lower case, every run of whitespace (newlines included)
becomes one space. Error rates are corpus-level (total edits / total reference length), computed
with jiwer; an image with an empty reference caption is left out.

    python bench/ocr_quality.py --engines rapidocr easyocr   # --manifest, default <data root>/val.jsonl

Writes bench/results/ocr_quality.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import jiwer

from dhumor.data.readers import read_manifest
from dhumor.images import load_image
from dhumor.ocr import OCR
from dhumor.paths import data_root
from record import Recorder, refuse_subset_over_default, results_path


def normalise(s: str) -> str:
    return re.sub(r"\s+", " ", (s or "").lower()).strip()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--manifest", default=str(data_root() / "val.jsonl"),
                    help="a manifest with captions (default: the data root's val.jsonl)")
    ap.add_argument("--engines", nargs="+", default=["rapidocr", "easyocr"], help="OCR engines to compare")
    ap.add_argument("--limit", type=int, default=None, help="only the first N captioned memes (a subset run)")
    ap.add_argument("--out", default=str(results_path("ocr_quality")), help="where the numbers go")
    args = ap.parse_args(argv)
    rec = Recorder("ocr_quality")
    refuse_subset_over_default(ap, args.out, results_path("ocr_quality"), ["--limit"] if args.limit else [])
    rows = []
    memes = [m for m in read_manifest(args.manifest).memes if normalise(m.caption)][: args.limit]
    images = [load_image(m.image) for m in memes]
    refs = [normalise(m.caption) for m in memes]
    for engine in args.engines:
        ocr = OCR(engine, cache=None)  # no cache: every image is really read
        ocr.read(images[0])  # load the models outside the timing
        t0 = time.perf_counter()
        hyps = [normalise(ocr.read(img)) for img in images]
        sec = (time.perf_counter() - t0) / len(images)
        out = {"engine": engine, "images": len(images), "cer": round(jiwer.cer(refs, hyps), 4),
               "wer": round(jiwer.wer(refs, hyps), 4), "seconds_per_image": round(sec, 3),
               "empty_outputs": sum(not h for h in hyps)}
        rows.append(out)
        print(json.dumps(out), flush=True)
    rec.write({"manifest": Path(args.manifest).name, "normalisation": "lower case, whitespace runs to one space",
               "error_rates": "corpus-level (jiwer)", "engines": rows}, args.out)


if __name__ == "__main__":
    main()
