"""The ``dhumor`` command.

Training goes through LightningCLI (``fit``, ``validate``, ``test``, ``predict`` with ``--config``);
the other subcommands (``evaluate``, ``score``, ``explain``, ``ocr``, ``demo``) are plain argparse.
The library never imports this module.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import DHumorError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
# Settings the data module needs from the model: written once, under model:, in a config.
LINKED = ("task", "streams", "image_encoder", "caption_encoder", "reasoning_encoder", "mode", "inputs", "max_tokens")


def _setup_logging() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    log = logging.getLogger("dhumor")
    if not log.handlers:  # Lightning configures its own loggers; only ours needs a handler
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s dhumor: %(message)s"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def run_lightning(argv: list[str] | None, run: bool = True):
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.cli import LightningCLI

    from .callbacks import ExportBestCheckpoint
    from .data.datamodule import MemeDataModule
    from .model.lit import DHumorModule
    from .prediction_writer import JsonlPredictionWriter

    class DHumorCLI(LightningCLI):
        def add_arguments_to_parser(self, parser):
            parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
            parser.set_defaults({"checkpoint.monitor": "val/macro_f1", "checkpoint.mode": "max",
                                 "checkpoint.save_top_k": 1, "checkpoint.filename": "best-epoch{epoch:02d}",
                                 "checkpoint.auto_insert_metric_name": False})
            parser.add_lightning_class_args(EarlyStopping, "early_stopping")
            parser.set_defaults({"early_stopping.monitor": "val/macro_f1", "early_stopping.mode": "max",
                                 "early_stopping.patience": 10})
            parser.add_lightning_class_args(JsonlPredictionWriter, "prediction_writer")
            for k in LINKED:
                parser.link_arguments(f"model.{k}", f"data.{k}")

    return DHumorCLI(DHumorModule, MemeDataModule, args=argv, seed_everything_default=0, run=run,
                     trainer_defaults={"callbacks": [ExportBestCheckpoint()]},
                     save_config_kwargs={"overwrite": True})


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, help="stage-cache SQLite file (default $DHUMOR_CACHE or ~/.cache/dhumor)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dhumor",
        description="Dark-humor understanding for memes. Training: dhumor fit|validate|test|predict --config FILE "
                    "(LightningCLI; `dhumor fit --help`).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `dhumor {name} --help`)", add_help=False)

    e = sub.add_parser("evaluate", help="metrics of a checkpoint on a labelled manifest")
    e.add_argument("--checkpoint", default=None, help="checkpoint directory or .ckpt (default: the shipped one)")
    e.add_argument("--manifest", required=True, help="HarMeme jsonl or D-HUMOR csv/xlsx")
    e.add_argument("--images", default=None, help="folder of the manifest's images (default: images/ beside it)")
    e.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor"])
    e.add_argument("--skip-bad", action="store_true", help="skip bad rows and unusable images instead of failing")
    e.add_argument("--explanations", default=None, help="explanations JSONL from `dhumor explain` (reasoning stream)")
    e.add_argument("--explanation-iteration", type=int, default=-1, help="which loop iteration to use (-1: last)")
    e.add_argument("--json", action="store_true", help="print one JSON object (per task metrics) to stdout")
    _add_common(e)

    s = sub.add_parser("score", help="score a folder of memes or a manifest into JSONL/CSV (resumable)")
    s.add_argument("input", help="folder (walked recursively) or manifest")
    s.add_argument("--checkpoint", default=None, help="checkpoint (default: the shipped one)")
    s.add_argument("--out", required=True, help="results .jsonl or .csv; rerun with the same --out to resume")
    s.add_argument("--ocr", default="rapidocr", choices=["rapidocr", "easyocr", "none"],
                   help="OCR engine; 'none' uses the manifest's captions (or no caption for a folder)")
    s.add_argument("--explain", default="none", choices=["none", "offline", "openai", "transformers"],
                   help="explanation backend: explanations go into every row, and into the model when the "
                        "checkpoint has a reasoning stream")
    s.add_argument("--explain-model", default=None, help="openai: served model name; transformers: hub id or dir")
    s.add_argument("--base-url", default=None, help="openai-compatible server URL (or DHUMOR_OPENAI_BASE_URL)")
    s.add_argument("--iterations", type=int, default=None, help="Role-Reversal loop iterations (explain)")
    s.add_argument("--workers", type=int, default=2, help="threads for decoding and OCR")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--shard", default=None, help="i/n: score only shard i of n (0-based), for n machines")
    s.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor", "folder"])
    s.add_argument("--images", default=None, help="images folder of a manifest")
    s.add_argument("--threshold", type=float, default=None, help="decision threshold on the primary task")
    s.add_argument("--retry-errors", action="store_true", help="rescore rows that ended in an error")
    _add_common(s)

    m = sub.add_parser("merge", help="merge shard outputs into one file, refusing duplicates")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)

    x = sub.add_parser("explain", help="explain memes with a (vision-)language model and the Role-Reversal loop")
    x.add_argument("input", help="folder (walked recursively) or manifest")
    x.add_argument("--out", required=True, help="explanations .jsonl; rerun with the same --out to resume")
    x.add_argument("--backend", default="offline", choices=["offline", "openai", "transformers"])
    x.add_argument("--model", default=None, help="openai: served model name; transformers: hub id or directory; "
                                                  "offline: another GGUF file")
    x.add_argument("--base-url", default=None, help="openai: e.g. http://localhost:8000/v1 (or DHUMOR_OPENAI_BASE_URL)")
    x.add_argument("--no-images", action="store_true", help="openai: send visual cues instead of the image")
    x.add_argument("--iterations", type=int, default=3, help="Role-Reversal iterations (1 = explain only)")
    x.add_argument("--threshold", type=float, default=0.9, help="stop early when a revision is this similar (0-1)")
    x.add_argument("--prompt-version", default="v1")
    x.add_argument("--max-tokens", type=int, default=400)
    x.add_argument("--ocr", default="auto", choices=["auto", "rapidocr", "easyocr", "none"],
                   help="auto: the manifest's captions when it has them, else rapidocr")
    x.add_argument("--batch-size", type=int, default=8, help="memes per generation batch")
    x.add_argument("--concurrency", type=int, default=4, help="openai: requests in flight")
    x.add_argument("--threads", type=int, default=None, help="offline: CPU threads for llama.cpp (default: all)")
    x.add_argument("--shard", default=None, help="i/n: only shard i of n")
    x.add_argument("--order", default="input", choices=["input", "shuffle"],
                   help="shuffle: a seeded random order, so that a partial run is a random sample")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--limit", type=int, default=None, help="only the first N items (after ordering)")
    x.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor", "folder"])
    x.add_argument("--images", default=None)
    _add_common(x)

    d = sub.add_parser("demo", help="the Gradio moderation demo")
    d.add_argument("--checkpoint", default=None, help="checkpoint (default: the shipped one)")
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=int, default=7860)
    d.add_argument("--ocr", default="rapidocr", choices=["rapidocr", "easyocr", "none"])
    d.add_argument("--explain", default="none", choices=["none", "offline", "openai", "transformers"],
                   help="explanation backend shown on the page (and fed to a reasoning stream)")
    d.add_argument("--model", default=None, help="explanation model (openai: served name; transformers: id or dir)")
    d.add_argument("--base-url", default=None, help="openai-compatible server URL")
    d.add_argument("--iterations", type=int, default=3)
    d.add_argument("--review-log", default=None, help="SQLite review log (default $DHUMOR_REVIEW_LOG or "
                                                      "~/.local/share/dhumor/reviews.sqlite)")
    d.add_argument("--max-file-mb", type=float, default=10.0, help="upload size limit")
    _add_common(d)

    o = sub.add_parser("ocr", help="print the OCR text of images (or compare with a manifest's captions)")
    o.add_argument("input", help="image file, folder or manifest")
    o.add_argument("--engine", default="rapidocr", choices=["rapidocr", "easyocr"])
    o.add_argument("--limit", type=int, default=None)
    _add_common(o)
    return p


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate, format_metrics
    from .pipeline import Pipeline

    pipe = Pipeline.from_checkpoint(args.checkpoint, cache=args.cache, device=args.device, progress=not args.quiet)
    metrics, summary = evaluate(pipe, args.manifest, args.images, args.format, args.skip_bad, args.explanations,
                                args.explanation_iteration)
    print(json.dumps(summary), file=sys.stderr)
    if args.json:
        print(json.dumps(metrics))
    else:
        print(format_metrics(metrics))
    return 0


def cmd_score(args) -> int:
    from .cache import StageCache
    from .ocr import create_ocr
    from .pipeline import Pipeline
    from .results_file import ResultsFile
    from .scoring import Scorer, collect_items, in_shard, parse_shard

    shard = parse_shard(args.shard)
    cache = StageCache(args.cache)
    explainer = None
    if args.explain != "none":
        from .explain import create_explainer

        explainer = create_explainer(args.explain, cache=cache, iterations=args.iterations, model=args.explain_model,
                                     base_url=args.base_url)
    pipe = Pipeline.from_checkpoint(args.checkpoint, cache=args.cache, device=args.device, ocr=create_ocr(args.ocr, cache),
                                    explainer=explainer)
    if args.threshold is not None:
        pipe.thresholds[pipe.schema.primary] = args.threshold
    if explainer is not None and "reasoning" not in pipe.streams:
        print(f"dhumor score: note: {pipe.checkpoint} has no reasoning stream; explanations are written to the "
              f"rows but do not change its predictions", file=sys.stderr)
    items = [it for it in collect_items(args.input, args.format, args.images) if in_shard(it.id, shard)]
    results = ResultsFile(args.out, pipe.schema)
    scorer = Scorer(pipe, results, batch_size=args.batch_size, workers=args.workers,
                    caption_from_manifest=args.ocr == "none", progress=not args.quiet)
    summary = scorer.run(items, retry_errors=args.retry_errors)
    d = summary.to_dict()
    if summary.already_done == summary.total and not summary.interrupted:
        print(f"dhumor score: nothing to do: all {summary.total} memes already have a row in {args.out}", file=sys.stderr)
    print(json.dumps(d), file=sys.stderr)
    if summary.interrupted:
        print(f"dhumor score: interrupted; {summary.scored + summary.failed} rows written this run are kept. "
              f"Run the same command again to continue.", file=sys.stderr)
        return 130
    return 0


def cmd_explain(args) -> int:
    from pathlib import Path

    from .cache import StageCache
    from .explain import create_explainer
    from .explain.run import order_items, run_explain
    from .ocr import create_ocr
    from .scoring import collect_items, in_shard, parse_shard

    cache = StageCache(args.cache)
    shard = parse_shard(args.shard)
    items = [it for it in collect_items(args.input, args.format, args.images) if in_shard(it.id, shard)]
    items = order_items(items, args.order, args.seed)[: args.limit]
    engine = args.ocr
    if engine == "auto":
        engine = "none" if not Path(args.input).is_dir() else "rapidocr"
    ocr = create_ocr(engine, cache)
    if args.ocr in ("rapidocr", "easyocr"):  # asked for OCR explicitly: it wins over a manifest's text
        for it in items:
            it.caption = None
    if engine == "none":
        for it in items:
            it.caption = it.caption or ""
    explainer = create_explainer(args.backend, cache=cache, iterations=args.iterations,
                                 similarity_threshold=args.threshold, batch_size=args.batch_size,
                                 prompt_version=args.prompt_version, max_tokens=args.max_tokens, model=args.model,
                                 base_url=args.base_url, concurrency=args.concurrency, send_images=not args.no_images,
                                 threads=args.threads)
    summary = run_explain(explainer, items, args.out, ocr=ocr, batch_size=args.batch_size, progress=not args.quiet)
    if summary.already_done == summary.total and not summary.interrupted:
        print(f"dhumor explain: nothing to do: all {summary.total} memes already have a row in {args.out}",
              file=sys.stderr)
    print(json.dumps(summary.to_dict()), file=sys.stderr)
    from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED

    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_ROWS_FAILED if summary.failed or summary.unreadable else EXIT_OK


def cmd_demo(args) -> int:
    from .cache import StageCache
    from .demo import launch
    from .ocr import create_ocr
    from .pipeline import Pipeline
    from .review import ReviewLog

    cache = StageCache(args.cache)
    explainer = None
    if args.explain != "none":
        from .explain import create_explainer

        explainer = create_explainer(args.explain, cache=cache, iterations=args.iterations, model=args.model,
                                     base_url=args.base_url)
    pipe = Pipeline.from_checkpoint(args.checkpoint, cache=args.cache, device=args.device,
                                    ocr=create_ocr(args.ocr, cache), explainer=explainer)
    launch(pipe, ReviewLog(args.review_log), host=args.host, port=args.port, max_file_mb=args.max_file_mb)
    return 0


def cmd_merge(args) -> int:
    from .merge import merge_results

    n = merge_results(args.inputs, args.out)
    print(f"dhumor merge: {n} rows -> {args.out}", file=sys.stderr)
    return 0


def cmd_ocr(args) -> int:
    from pathlib import Path

    from .cache import StageCache
    from .ocr import OCR
    from .scoring import collect_items

    ocr = OCR(args.engine, StageCache(args.cache))
    path = Path(args.input)
    items = [path] if path.is_file() and path.suffix.lower() not in (".jsonl", ".csv", ".xlsx", ".json") else \
        [it.path for it in collect_items(path)]
    for p in items[: args.limit]:
        try:
            text = ocr.read_file(p)
            print(json.dumps({"path": str(p), "text": text}, ensure_ascii=False))
        except DHumorError as e:
            print(json.dumps({"path": str(p), "error": str(e)}, ensure_ascii=False))
    return 0


COMMANDS = {"evaluate": cmd_evaluate, "score": cmd_score, "explain": cmd_explain, "demo": cmd_demo,
            "merge": cmd_merge, "ocr": cmd_ocr}


def main(argv: list[str] | None = None) -> int:
    explicit = argv is not None
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    if argv and argv[0] in LIGHTNING_COMMANDS:
        run_lightning(argv if explicit else None)
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except (DHumorError, ValueError) as e:
        print(f"dhumor {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
