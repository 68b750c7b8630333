"""Scoring throughput on this machine: memes per second for OCR alone, features alone, the whole
pipeline without explanations, and with the offline explanation default.

Every stage runs cold (a fresh, empty stage cache), so nothing is served from earlier runs.

    python bench/score.py --n 100 --explain-n 10          # memes: --images, default <data root>/images

Writes bench/results/score.json (``--out``).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dhumor.cache import StageCache
from dhumor.encoders.features import FeatureExtractor
from dhumor.images import load_image_with_digest
from dhumor.ocr import OCR
from dhumor.inference.pipeline import Pipeline
from dhumor.inference.results_file import ResultsFile
from dhumor.inference.items import collect_items
from dhumor.inference.scoring import Scorer
from dhumor.paths import data_root
from record import Recorder, results_path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", default=str(data_root() / "images"),
                    help="a folder of memes (default: the data root's images/, $DHUMOR_DATA or data/harmeme-c)")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--explain-n", type=int, default=10, help="memes for the run with explanations (slow)")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=str(results_path("score")))
    args = ap.parse_args(argv)
    rec = Recorder("score")
    items = collect_items(args.images)[: args.n]
    torch_threads = __import__("torch").get_num_threads()
    rows = []

    def report(stage, n, sec, **extra):
        r = {"stage": stage, "memes": n, "seconds": round(sec, 2), "memes_per_second": round(n / sec, 2),
             **extra}
        rows.append(r)
        print(json.dumps(r), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        decoded = [load_image_with_digest(it.path) for it in items]
        ocr = OCR("rapidocr", cache=None)
        ocr.read(decoded[0][0])  # model load outside the timing
        t = time.perf_counter()
        for img, _ in decoded:
            ocr.read(img)
        report("ocr_rapidocr", len(decoded), time.perf_counter() - t)

        fx = FeatureExtractor({"image": "efficientnet-lite0", "caption": "all-mpnet-base-v2"},
                              StageCache(Path(tmp) / "f.sqlite"), progress=False, batch_size=args.batch_size)
        fx.module("image"), fx.module("caption")
        t = time.perf_counter()
        fx.image_features_from_pil([d[0] for d in decoded], [d[1] for d in decoded])
        fx.text_features("caption", [f"caption number {i} of a meme about something" for i in range(len(decoded))])
        report("features_image+caption", len(decoded), time.perf_counter() - t)

        for explain_backend, n in ((None, len(items)), ("offline", args.explain_n)):
            cache = StageCache(Path(tmp) / f"p-{explain_backend}.sqlite")
            explainer = None
            if explain_backend:
                from dhumor.explain import create_explainer

                explainer = create_explainer(explain_backend, cache=cache)
            pipe = Pipeline.from_checkpoint(args.checkpoint, cache=Path(tmp) / f"p-{explain_backend}.sqlite",
                                            ocr=OCR("rapidocr", cache), explainer=explainer)
            pipe.extractor.module("image"), pipe.extractor.module("caption")
            pipe.ocr.read(decoded[0][0])
            out = Path(tmp) / f"out-{explain_backend}.jsonl"
            scorer = Scorer(pipe, ResultsFile(out, pipe.schema), batch_size=args.batch_size, workers=args.workers,
                            progress=False)
            t = time.perf_counter()
            summary = scorer.run(items[:n])
            report("pipeline_" + ("with_offline_explanations" if explain_backend else "no_explanations"), n,
                   time.perf_counter() - t, scored=summary.scored, failed=summary.failed)
    rec.write({"torch_threads": torch_threads, "batch_size": args.batch_size, "workers": args.workers,
               "cold_stage_cache": True, "stages": rows}, args.out)
    return rows


if __name__ == "__main__":
    main()
