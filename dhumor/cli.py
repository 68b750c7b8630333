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


def run_lightning(argv: list[str] | None):
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

    return DHumorCLI(DHumorModule, MemeDataModule, args=argv, seed_everything_default=0,
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


COMMANDS = {"evaluate": cmd_evaluate}


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
    from .errors import DHumorError

    try:
        return COMMANDS[args.command](args)
    except DHumorError as e:
        print(f"dhumor {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
