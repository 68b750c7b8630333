"""The ``dhumor`` command.

Training goes through LightningCLI (``fit``, ``validate``, ``test``, ``predict`` with ``--config``);
the other subcommands (``evaluate``, ``score``, ``explain``, ``ocr``, ``demo``) are plain argparse.
The library never imports this module.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time

from dhumor.errors import (EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_ROWS_FAILED, EXIT_USAGE, ConfigError,
                     DataError, DHumorError)
from dhumor.ocr import ENGINES, engine_choices  # the registry only (no engine is imported)

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

    from dhumor.model.export import ExportBestCheckpoint
    from dhumor.data.datamodule import MemeDataModule, check_subcommand_data
    from dhumor.model.lit import DHumorModule
    from dhumor.inference.prediction_writer import JsonlPredictionWriter

    # "Seed set to N" would come before any one-line configuration error; the seed is in the saved config.
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)

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

        def before_instantiate_classes(self):
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            # Missing data fails here, in one line, before Lightning sets up a trainer and says so at length.
            check_subcommand_data(self.subcommand, cfg.get("data") or {})
            # Retraining (model.init_from): the checkpoint's schema/encoders/streams win, in the data module too.
            # Set under model: as well, though DHumorModule.__init__ applies them itself: jsonargparse links
            # model.* into data.* again when it instantiates, so data: alone would be overwritten.
            if cfg.get("model") is not None and cfg["model"].get("init_from"):
                from dhumor.model.lit import architecture_from_checkpoint

                arch = architecture_from_checkpoint(cfg["model"]["init_from"])
                for k, v in arch.items():
                    cfg["model"][k] = v
                for k in LINKED:
                    cfg["data"][k] = arch[k]

    return DHumorCLI(DHumorModule, MemeDataModule, args=argv, seed_everything_default=0, run=run,
                     trainer_defaults={"callbacks": [ExportBestCheckpoint()]},
                     save_config_kwargs={"overwrite": True})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", default=None, help="stage-cache SQLite file (default: $DHUMOR_CACHE, else "
                                                  "~/.cache/dhumor/cache.sqlite)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (also: DHUMOR_DEBUG=1)")


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be 1 or more, not {n}")
    return n


def _number(ok, why: str, expected: str = "a number"):
    """An argparse type: a float for which ``ok`` holds (nan and inf refused where ``ok`` says so), checked
    here, before any model loads; the message says ``why`` not."""
    def parse(text: str) -> float:
        try:
            x = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, not {text!r}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"{why}, not {text}")
        return x
    return parse


_probability = _number(lambda x: 0.0 <= x <= 1.0, "must lie in [0, 1]", "a number from 0 to 1")  # nan: False
_finite_float = _number(math.isfinite, "must be a finite number")
_positive_float = _number(lambda x: 0 < x < math.inf, "must be a finite number above 0")


def _port(text: str) -> int:
    n = _positive_int(text)
    if n > 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, not {n}")
    return n


def _add_explainer(p: argparse.ArgumentParser, default: str = "none") -> None:
    """The explanation options, named the same in every subcommand (``dhumor explain`` has no "none")."""
    from dhumor.explain.backends import BACKENDS, backend_choices

    p.add_argument("--explain", default=default, choices=backend_choices(with_none=default == "none"),
                   help=f"explanation backend (Role-Reversal loop): {BACKENDS.help()}")
    p.add_argument("--explain-model", default=None,
                   help="explanation model: openai: the served model name; transformers: a hub id or directory; "
                        "offline: another GGUF file")
    p.add_argument("--base-url", default=None, help="openai-compatible server, e.g. http://localhost:8000/v1 "
                                                    "(default: $DHUMOR_OPENAI_BASE_URL)")
    p.add_argument("--iterations", type=_positive_int, default=3,
                   help="Role-Reversal loop iterations (1 = explain only)")
    p.add_argument("--similarity-threshold", type=_probability, default=0.9,
                   help="stop the loop early when a revision is at least this similar to the previous one (0-1)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="offline: CPU threads for llama.cpp (default: all; a demo sharing the machine with other "
                        "work may answer sooner with fewer)")


def _add_decision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="checkpoint directory or .ckpt (default: $DHUMOR_CHECKPOINT, "
                                                       "else the one shipped with dhumor)")
    p.add_argument("--decision-threshold", type=_probability, default=None,
                   help="threshold on the primary task's probability (default: the checkpoint's balanced preset)")
    p.add_argument("--on-unfamiliar", default="abstain", choices=["abstain", "flag", "ignore"],
                   help="the decision on a meme unlike the training memes: abstain (reason 'unfamiliar'), flag it "
                        "for a moderator, or decide it as any other (docs/unfamiliar.md)")
    p.add_argument("--ood-threshold", type=_finite_float, default=None,
                   help="unfamiliarity score above which a meme is unfamiliar (default: the checkpoint's, which "
                        "calls 5%% of its held-out split unfamiliar)")
    p.add_argument("--abstain-uncertain", action="store_true",
                   help="also abstain (reason 'uncertain') on the memes nearest the threshold: the checkpoint's "
                        "preset, which decides 80%% of its held-out split")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line naming the fix (exit 2), like every other configuration error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _data_parser(add) -> None:
    """``dhumor data``'s options."""
    dt = add("data", "get a dataset into the layout dhumor reads")
    dsub = dt.add_subparsers(dest="dataset", metavar="DATASET", required=True)
    h = dsub.add_parser("harmeme", formatter_class=_HelpFormatter,
                        help="HarMeme Harm-C from a clone of https://github.com/di-dimitrov/mmf",
                        description="Validate and convert Harm-C (train, val, test) from a clone of the public "
                                    "di-dimitrov/mmf repository: git clone --depth 1 https://github.com/di-dimitrov/mmf")
    h.add_argument("src", help="the mmf clone (or its data/datasets/memes/defaults folder)")
    h.add_argument("out", nargs="?", default=None, help="output folder (default: $DHUMOR_DATA, else data/harmeme-c)")
    h.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _evaluate_parser(add) -> None:
    """``dhumor evaluate``'s options."""
    e = add("evaluate", "metrics of a checkpoint on a labelled manifest")
    _add_decision(e)
    e.add_argument("--manifest", required=True, help="HarMeme jsonl or D-HUMOR csv/xlsx (relative paths: under the "
                                                     "data root, $DHUMOR_DATA or data/harmeme-c, when found there)")
    e.add_argument("--images", default=None, help="folder of the manifest's images (default: images/ beside it)")
    e.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor"],
                   help="manifest format: auto decides by its suffix")
    e.add_argument("--ocr", default="none", choices=engine_choices(),
                   help="'none' uses the manifest's captions; an engine reads them from the images instead")
    e.add_argument("--skip-bad", action="store_true", help="skip bad rows and unusable images instead of failing")
    e.add_argument("--explanations", default=None, help="explanations JSONL from `dhumor explain` (reasoning stream)")
    e.add_argument("--explanation-iteration", type=int, default=-1, help="which loop iteration to use (-1: last)")
    e.add_argument("--predictions", default=None, help="also write every meme's result row to this .jsonl")
    e.add_argument("--batch-size", type=_positive_int, default=64, help="memes per model batch")
    e.add_argument("--json", action="store_true", help="print one JSON object (per task metrics) to stdout")
    _add_common(e)


def _score_parser(add) -> None:
    """``dhumor score``'s options."""
    s = add("score", "score memes (an image, a folder or a manifest) into JSONL/CSV; resumable")
    s.add_argument("input", help="image file, folder (walked recursively) or manifest")
    _add_decision(s)
    s.add_argument("--out", required=True, help="results .jsonl or .csv; rerun with the same --out to resume")
    s.add_argument("--ocr", default="rapidocr", choices=engine_choices(),
                   help="OCR engine; 'none' uses the manifest's captions (or no caption for images)")
    _add_explainer(s)
    s.add_argument("--workers", type=_positive_int, default=2, help="threads for decoding and OCR")
    s.add_argument("--batch-size", type=_positive_int, default=16, help="memes per model batch (and per write)")
    s.add_argument("--shard", default=None, help="i/n: score only shard i of n (0-based), for n machines")
    s.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor", "folder"],
                   help="what the input is: auto decides by its suffix (or a folder)")
    s.add_argument("--images", default=None, help="images folder of a manifest (default: images/ beside it)")
    s.add_argument("--retry-errors", action="store_true",
                   help="also rescore rows whose file was unusable (transient failures are always retried)")
    s.add_argument("--rescore", action="store_true",
                   help="score again, into this --out, the rows written with other settings (another checkpoint, "
                        "threshold, OCR engine or explainer; or by an older dhumor that did not record them)")
    s.add_argument("--engine", default="local", choices=["local", "ray"],
                   help="ray: Ray Data stages (decode+OCR tasks, model actors) into a Parquet dataset --out X.parquet; "
                        "input may also be a URL (s3://, gs://, file://); needs dhumor[ray]")
    s.add_argument("--ray-address", default=None, help="ray: auto, ray://HOST:PORT or HOST:PORT (default: start a "
                                                       "local Ray instance on this machine)")
    s.add_argument("--ray-batch-size", type=_positive_int, default=None,
                   help="ray: memes per block, OCR task and model call (default: --batch-size)")
    s.add_argument("--ray-model-actors", type=_positive_int, default=None,
                   help="ray: model actors (default: one per GPU, else one)")
    s.add_argument("--ray-gpus-per-actor", type=float, default=None,
                   help="ray: GPUs per model actor (default: 1 when the cluster has GPUs, else 0)")
    s.add_argument("--ray-ocr-cpus", type=float, default=1.0, help="ray: CPUs per decode+OCR task")
    s.add_argument("--ray-explain-actors", type=_positive_int, default=1,
                   help="ray: explanation actors (each keeps the backend's requests in flight)")
    _add_common(s)


def _merge_parser(add) -> None:
    """``dhumor merge``'s options."""
    m = add("merge", "merge shard outputs into one file, refusing duplicates")
    m.add_argument("inputs", nargs="+")
    m.add_argument("--out", required=True)
    m.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _explain_parser(add) -> None:
    """``dhumor explain``'s options."""
    x = add("explain", "explain memes with a (vision-)language model and the Role-Reversal loop")
    x.add_argument("input", help="image file, folder (walked recursively) or manifest")
    x.add_argument("--out", required=True, help="explanations .jsonl; rerun with the same --out to resume")
    _add_explainer(x, default="offline")
    x.add_argument("--no-images", action="store_true", help="openai: send visual cues instead of the image")
    # None: the explainer's DEFAULT_VERSION (importing it here would load torch before any fail-fast check).
    x.add_argument("--prompt-version", default=None,
                   help="prompt files under dhumor/explain/prompts: v2, the default (critique returns only the "
                        "fields it changes; about half the tokens), or v1 (the paper's full rewrite)")
    x.add_argument("--max-tokens", type=_positive_int, default=400,
                   help="completion tokens per generation; with prompts v2 at least what six capped fields need "
                        "(664 tokens), so the JSON can always close")
    x.add_argument("--ocr", default="auto", choices=["auto", *engine_choices()],
                   help="auto: the manifest's captions when it has them, else rapidocr")
    x.add_argument("--batch-size", type=_positive_int, default=8, help="memes per generation batch")
    x.add_argument("--concurrency", type=_positive_int, default=4, help="openai: requests in flight")
    x.add_argument("--shard", default=None, help="i/n: only shard i of n")
    x.add_argument("--order", default="input", choices=["input", "shuffle"],
                   help="shuffle: a seeded random order, so that a partial run is a random sample")
    x.add_argument("--seed", type=int, default=0)
    x.add_argument("--limit", type=_positive_int, default=None, help="only the first N items (after ordering)")
    x.add_argument("--format", default="auto", choices=["auto", "harmeme", "dhumor", "folder"],
                   help="what the input is: auto decides by its suffix (or a folder)")
    x.add_argument("--images", default=None, help="images folder of a manifest (default: images/ beside it)")
    _add_common(x)


def _demo_parser(add) -> None:
    """``dhumor demo``'s options."""
    d = add("demo", "the Gradio moderation demo")
    _add_decision(d)
    d.add_argument("--host", default="127.0.0.1")
    d.add_argument("--port", type=_port, default=7860)
    d.add_argument("--ocr", default="rapidocr", choices=engine_choices(), help="OCR engine of uploads")
    _add_explainer(d)
    d.add_argument("--review-log", default=None, help="SQLite review log (default: $DHUMOR_REVIEW_LOG, else "
                                                      "~/.local/share/dhumor/reviews.sqlite)")
    d.add_argument("--max-file-mb", type=_positive_float, default=10.0, help="upload size limit")
    d.add_argument("--queue", default=None, metavar="RESULTS_OR_FOLDER",
                   help="add a review-queue tab over a `dhumor score` results .jsonl (or a folder, scored on the way)")
    d.add_argument("--queue-root", default=None, metavar="DIR",
                   help="admins may open, from a list, the results files and folders directly under DIR as queues "
                        "(never a typed path)")
    d.add_argument("--auth", default=None, metavar="USERS_FILE",
                   help="sign-in in front of every page, API and file route, with the users and roles of this file "
                        "(`dhumor users add`); required for a --host other than loopback")
    d.add_argument("--concurrency", type=_positive_int, default=4,
                   help="memes scored and explained at once (requests beyond it wait their turn)")
    _add_common(d)


def _users_parser(add) -> None:
    """``dhumor users``'s options."""
    u = add("users", "the demo's users file: sign-in names, roles and argon2 password hashes")
    usub = u.add_subparsers(dest="users_command", metavar="ACTION", required=True)
    ua = usub.add_parser("add", formatter_class=_HelpFormatter, help="add a user (or replace their password and role)")
    ua.add_argument("file", help="users file (made if missing)")
    ua.add_argument("name")
    ua.add_argument("--role", default="reviewer", choices=["reviewer", "admin"],
                    help="reviewer: score uploads and review; admin: also open queues and export verdicts")
    ua.add_argument("--password-stdin", action="store_true", help="read the password from standard input (scripts)")
    ua.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ur = usub.add_parser("remove", formatter_class=_HelpFormatter, help="remove a user")
    ur.add_argument("file")
    ur.add_argument("name")
    ur.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _reviews_parser(add) -> None:
    """``dhumor reviews``'s options."""
    r = add("reviews", "the review log: export queue verdicts as training data")
    rsub = r.add_subparsers(dest="reviews_command", metavar="ACTION", required=True)
    rx = rsub.add_parser("export", formatter_class=_HelpFormatter, help="verdicts -> labelled manifest (conflicts listed, left out unless asked)")
    rx.add_argument("--out", required=True, help="reviewed.jsonl (harmeme) or reviewed.csv (dhumor)")
    rx.add_argument("--review-log", default=None, help="SQLite review log (default $DHUMOR_REVIEW_LOG or "
                                                       "~/.local/share/dhumor/reviews.sqlite)")
    rx.add_argument("--include-conflicts", action="store_true",
                    help="keep memes reviewers disagree on (the latest verdict wins)")
    rx.add_argument("--task", default=None, help="task schema of the verdicts (default: inferred from them)")
    rx.add_argument("--user", action="append", default=None, metavar="NAME",
                    help="only this reviewer's verdicts (repeat for several)")
    rx.add_argument("--since", default=None, metavar="TIME", help="only verdicts at or after this ISO time (UTC "
                                                                   "unless it says), e.g. 2026-12-01 or 2026-12-01T09:00")
    rx.add_argument("--until", default=None, metavar="TIME", help="only verdicts before this ISO time")
    rx.add_argument("--debug", action="store_true", help="show the traceback of an error")


def _ocr_parser(add) -> None:
    """``dhumor ocr``'s options."""
    o = add("ocr", "print the OCR text of memes (an image, a folder or a manifest)")
    o.add_argument("input", help="image file, folder or manifest")
    o.add_argument("--ocr", default="rapidocr", choices=ENGINES.names(), help="OCR engine")
    o.add_argument("--limit", type=_positive_int, default=None)
    _add_common(o)


def build_parser() -> argparse.ArgumentParser:
    """The parser; choices of ``--ocr`` and ``--explain`` come from the registries (no model is imported)."""
    p = _Parser(
        prog="dhumor", formatter_class=_HelpFormatter,
        description="Dark-humor understanding for memes. Training: dhumor fit|validate|test|predict --config FILE "
                    "(LightningCLI; `dhumor fit --help`).",
        epilog="Exit codes: 0 every input processed; 1 internal error; 2 configuration or usage error (one line "
               "names the fix); 3 the batch finished but some rows are errors; 130 interrupted (rerun to continue).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in LIGHTNING_COMMANDS:
        sub.add_parser(name, help=f"LightningCLI {name} (see `dhumor {name} --help`)", add_help=False)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    _data_parser(add)
    _evaluate_parser(add)
    _score_parser(add)
    _merge_parser(add)
    _explain_parser(add)
    _demo_parser(add)
    _users_parser(add)
    _reviews_parser(add)
    _ocr_parser(add)
    return p


def _unfamiliar_args(args) -> dict:
    """The unfamiliarity and abstention options of score / evaluate / demo, for Pipeline.from_checkpoint."""
    return {"on_unfamiliar": args.on_unfamiliar, "ood_threshold": args.ood_threshold,
            "abstain_uncertain": args.abstain_uncertain}


def _check_unfamiliar_args(args, meta: dict) -> None:
    """--abstain-uncertain needs the checkpoint's preset: refused before any model loads."""
    if args.abstain_uncertain and not (meta or {}).get("abstention"):
        raise ConfigError(f"{args.checkpoint or 'the checkpoint'} has no confidence-abstention preset (dhumor.json "
                          f"'abstention', fitted by `dhumor fit`); leave out --abstain-uncertain")


def _explainer_from_args(args, cache, **extra):
    from dhumor.explain import create_explainer

    return create_explainer(args.explain, cache=cache, iterations=args.iterations,
                            similarity_threshold=args.similarity_threshold, model=args.explain_model,
                            base_url=args.base_url, threads=args.threads, **extra)


def cmd_data(args) -> int:
    from dhumor.data.convert import convert_harmeme
    from dhumor.paths import data_root

    out = data_root(args.out).resolve()
    counts = convert_harmeme(args.src, out)
    for split, c in counts.items():
        levels = ", ".join(f"{k} {v}" for k, v in sorted(c["harmfulness"].items()))
        print(f"{split:5s} {c['memes']:5d} memes ({levels})", file=sys.stderr)
    print(f"dhumor data: Harm-C written to {out}; use it with `export DHUMOR_DATA={out}` (or --data.root {out})",
          file=sys.stderr)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from dhumor.cache import StageCache
    from dhumor.inference.evaluation import evaluate, format_metrics
    from dhumor.ocr import create_ocr
    from dhumor.paths import resolve_data_path
    from dhumor.inference.pipeline import Pipeline
    from dhumor.inference.preflight import check_checkpoint, check_input, check_ocr

    if args.predictions:
        from dhumor.inference.results_file import check_not_input, check_own, claim_output

        check_not_input(args.predictions, args.manifest, resolve_data_path(args.manifest), args.images,
                        args.explanations)
        claim_output(args.predictions, (".jsonl",))  # a bad or busy path is refused before any model loads
        check_own(args.predictions, "score")  # it is rewritten whole: only ever over an earlier one of ours
    manifest = check_input(resolve_data_path(args.manifest))
    check_ocr(args.ocr)
    ckpt, meta = check_checkpoint(args.checkpoint)
    _check_unfamiliar_args(args, meta)
    cache = StageCache(args.cache)
    pipe = Pipeline.from_checkpoint(ckpt, cache=cache, device=args.device, progress=not args.quiet,
                                    ocr=create_ocr(args.ocr, cache), threshold=args.decision_threshold,
                                    **_unfamiliar_args(args))
    metrics, summary = evaluate(pipe, manifest, args.images, args.format, args.skip_bad, args.explanations,
                                args.explanation_iteration, predictions=args.predictions, batch_size=args.batch_size)
    print(json.dumps(summary), file=sys.stderr)
    print(json.dumps(metrics) if args.json else format_metrics(metrics))
    return EXIT_OK


def cmd_score(args) -> int:
    if args.engine == "ray":  # Ray Data across a cluster (or a local instance): dhumor/inference/ray_engine.py
        from dhumor.inference.ray_engine import score_command

        return score_command(args)
    from dhumor.inference.results_file import ResultsFile, check_not_input, check_own, claim_output, output_files

    check_not_input(args.out, args.input, args.images)  # a run never writes what it reads
    claim_output(args.out)  # a bad --out, or another run on it, is refused at once, before torch is imported
    check_own(args.out, "score")  # a file that is not a results file: refused, untouched, in a second
    from dhumor.inference.items import collect_items, in_shard, parse_shard
    from dhumor.inference.preflight import (check_checkpoint, check_checkpoint_weights, check_explainer, check_input,
                                            check_ocr)
    from dhumor.schema import TaskSchema

    # Everything a user can get wrong is checked before a model loads (and, but for the weights' shapes,
    # before torch is imported).
    shard = parse_shard(args.shard)
    source = check_input(args.input)
    check_ocr(args.ocr)
    check_explainer(args.explain, args.explain_model, args.base_url)
    ckpt, meta = check_checkpoint(args.checkpoint, weights=False)
    _check_unfamiliar_args(args, meta)
    results = ResultsFile(args.out, TaskSchema.from_dict(meta["schema"])).verify()  # ours? before a byte changes
    done = _check_provenance_early(results, ckpt, meta, args)
    items = [it for it in collect_items(source, args.format, args.images, exclude=output_files(args.out))
             if in_shard(it.id, shard)]
    if done is not None:
        from dhumor.inference.scoring import summary_if_done

        summary = summary_if_done(results, items, done, args.retry_errors)
        if summary is not None:  # every meme has its final row: no model needs to load to say so
            results.repair()  # a torn last line (a run killed mid-write) goes, as in any resumed run
            return summary.report(source, args.out)

    check_checkpoint_weights(ckpt, meta)  # the first import of torch: only when a model is to load
    from dhumor.cache import StageCache
    from dhumor.ocr import create_ocr
    from dhumor.inference.pipeline import Pipeline
    from dhumor.inference.scoring import Scorer

    cache = StageCache(args.cache)
    explainer = _explainer_from_args(args, cache) if args.explain != "none" else None
    pipe = Pipeline.from_checkpoint(ckpt, cache=cache, device=args.device, ocr=create_ocr(args.ocr, cache),
                                    explainer=explainer, threshold=args.decision_threshold, progress=False,
                                    **_unfamiliar_args(args))
    if explainer is not None and "reasoning" not in pipe.streams:
        print(f"dhumor score: note: {pipe.checkpoint} has no reasoning stream; explanations are written to the "
              f"rows but do not change its predictions", file=sys.stderr)
    scorer = Scorer(pipe, results, batch_size=args.batch_size, workers=args.workers, progress=not args.quiet)
    summary = scorer.run(items, retry_errors=args.retry_errors, rescore=args.rescore)
    return summary.report(source, args.out)


def _check_provenance_early(results, ckpt, meta, args) -> None:
    """Before any model loads: refuse an --out whose rows another checkpoint, threshold or OCR engine wrote
    (the explainer's settings are compared too, once it is built: :meth:`Scorer.run`). Returns the file's
    index when every setting is known to match (no explainer), so a finished run needs no model."""
    from dhumor.inference.results_file import check_provenance
    from dhumor.inference.scoring import planned_provenance

    if args.rescore or not results.path.exists():
        return None
    planned = planned_provenance(ckpt, meta, args.decision_threshold, args.ocr, args.on_unfamiliar,
                                 args.ood_threshold, args.abstain_uncertain)
    mine = {k: planned[k] for k in ("checkpoint", "threshold", "ocr")}
    index = results.index()
    check_provenance(results, index, mine, rescore=False, fields=tuple(mine))
    if args.explain != "none":  # the explainer's settings are only known once it is built
        return None
    check_provenance(results, index, {**planned, "explainer": None}, rescore=False)
    return index


def cmd_explain(args) -> int:
    from dhumor.inference.results_file import ResultsFile, check_not_input, claim_output, output_files

    check_not_input(args.out, args.input, args.images)
    claim_output(args.out, (".jsonl",))
    ResultsFile(args.out, None, kind="explain").verify()  # a foreign file is refused before any model loads
    from dhumor.cache import StageCache
    from dhumor.inference.explain_run import order_items, run_explain
    from dhumor.inference.items import collect_items, in_shard, parse_shard
    from dhumor.ocr import create_ocr
    from dhumor.inference.preflight import check_explainer, check_input, check_ocr

    shard = parse_shard(args.shard)
    source = check_input(args.input)
    check_explainer(args.explain, args.explain_model, args.base_url)
    engine = args.ocr
    if engine == "auto":
        engine = "none" if source.suffix.lower() in (".jsonl", ".json", ".csv", ".xlsx") else "rapidocr"
    check_ocr(engine)
    cache = StageCache(args.cache)
    items = [it for it in collect_items(source, args.format, args.images, exclude=output_files(args.out))
             if in_shard(it.id, shard)]
    items = order_items(items, args.order, args.seed)[: args.limit]
    ocr = create_ocr(engine, cache)
    if args.ocr not in ("auto", "none"):  # asked for an engine explicitly: it wins over a manifest's text
        for it in items:
            it.caption = None
    if engine == "none":
        for it in items:
            it.caption = it.caption or ""
    explainer = _explainer_from_args(args, cache, batch_size=args.batch_size, prompt_version=args.prompt_version,
                                     max_tokens=args.max_tokens, concurrency=args.concurrency,
                                     send_images=not args.no_images)
    summary = run_explain(explainer, items, args.out, ocr=ocr, batch_size=args.batch_size, progress=not args.quiet)
    if summary.already_done == summary.total and not summary.interrupted:
        print(f"dhumor explain: nothing to do: all {summary.total} memes already have a row in {args.out}",
              file=sys.stderr)
    print(json.dumps(summary.to_dict()), file=sys.stderr)
    if summary.server_failures:
        print(f"dhumor explain: {summary.server_failures} memes were not fully explained because the server failed "
              f"(rows marked \"retry\"); rerun the same command to redo them", file=sys.stderr)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    # A row cut short by the server (a later iteration failed; marked "retry") is not final either.
    return EXIT_ROWS_FAILED if (summary.failed or summary.unreadable or summary.server_failures) else EXIT_OK


def cmd_demo(args) -> int:
    from dhumor.cache import StageCache
    from dhumor.inference.preflight import check_checkpoint, check_demo, check_explainer, check_ocr

    check_demo()
    from dhumor.app.auth import Users, is_loopback

    users = Users.load(args.auth) if args.auth else None
    if users is None and not is_loopback(args.host):
        raise ConfigError(f"--host {args.host} serves the demo to other machines: add --auth USERS_FILE "
                          f"(`dhumor users add USERS_FILE NAME --role admin`), or keep --host 127.0.0.1")
    if users is not None and not len(users):
        raise ConfigError(f"{args.auth}: no users in this file (add one with `dhumor users add {args.auth} NAME`)")
    if args.queue_root and not os.path.isdir(args.queue_root):
        raise ConfigError(f"--queue-root {args.queue_root}: no such folder")
    from dhumor.app.demo import launch
    from dhumor.app.model_thread import ModelThread
    from dhumor.ocr import create_ocr
    from dhumor.inference.pipeline import Pipeline
    from dhumor.review.log import ReviewLog

    check_ocr(args.ocr)
    check_explainer(args.explain, args.explain_model, args.base_url)
    ckpt, meta = check_checkpoint(args.checkpoint)
    _check_unfamiliar_args(args, meta)
    review_log = ReviewLog(args.review_log)
    cache = StageCache(args.cache)

    def load() -> Pipeline:
        explainer = _explainer_from_args(args, cache) if args.explain != "none" else None
        return Pipeline.from_checkpoint(ckpt, cache=cache, device=args.device, ocr=create_ocr(args.ocr, cache),
                                        explainer=explainer, threshold=args.decision_threshold,
                                        **_unfamiliar_args(args))

    models = ModelThread()  # models load and run on one thread (dhumor/app/model_thread.py says why)
    pipe = models.call(load)
    demo = launch(pipe, review_log, host=args.host, port=args.port, max_file_mb=args.max_file_mb, queue=args.queue,
                  models=models, block=False, users=users, queue_root=args.queue_root, concurrency=args.concurrency)
    try:
        while True:  # serve until Ctrl-C (or SIGTERM, made one by main)
            time.sleep(0.5)
    except KeyboardInterrupt:
        # First release the requests waiting on an explanation step: the server's close waits for
        # their streams, and the step in progress could take a minute.
        models.shutdown()
        # Gradio's close waits for every open stream to end (a client may hold one for minutes):
        # bounded here; the review log has committed each verdict already.
        closing = threading.Thread(target=demo.close, daemon=True)
        closing.start()
        closing.join(1)
        exports = getattr(demo, "_dhumor_exports", None)
        if exports is not None:  # os._exit below skips the finalizer that would remove it
            exports.cleanup()
        print("dhumor demo: stopped", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        # The interpreter's own teardown still waited for the explanation request in flight (seconds,
        # up to the server timeout); there is nothing left to write, so leave now.
        os._exit(EXIT_INTERRUPTED)
    return EXIT_INTERRUPTED


def cmd_reviews(args) -> int:
    from pathlib import Path

    from dhumor.review.log import ReviewLog, default_review_log
    from dhumor.review.export import export_reviews

    path = Path(args.review_log) if args.review_log else default_review_log()
    if not path.is_file():
        raise ConfigError(f"{path}: no review log here (pass --review-log)")
    from dhumor.review.export import check_export_out, parse_time

    check_export_out(args.out)  # a file an export did not write (a manifest, notes) is never replaced
    since, until = parse_time(args.since, "--since"), parse_time(args.until, "--until")
    rep = export_reviews(ReviewLog(path), args.out, include_conflicts=args.include_conflicts, schema=args.task,
                         users=args.user, since=since, until=until)
    for c in rep.conflicts:
        print(f"dhumor reviews: conflict on {c['id'] or c['sha256'][:12]} ({c['path']}): "
              + "; ".join(f"{m}: {json.dumps(v)}" for m, v in c["verdicts"].items()), file=sys.stderr)
    for line in rep.skipped:
        print(f"dhumor reviews: left out {line}", file=sys.stderr)
    print(json.dumps(rep.to_dict() | {"conflicts": len(rep.conflicts)}), file=sys.stderr)
    print(f"dhumor reviews: {rep.written} memes -> {rep.out}"
          + ("" if args.include_conflicts or not rep.conflicts else f" ({len(rep.conflicts)} conflicted left out; "
             f"--include-conflicts keeps them)"), file=sys.stderr)
    return EXIT_OK


def cmd_users(args) -> int:
    import getpass

    from dhumor.app.auth import add_user, check_name, remove_user

    if args.users_command == "remove":
        remove_user(args.file, args.name)
        print(f"dhumor users: removed {args.name} from {args.file}", file=sys.stderr)
        return EXIT_OK
    check_name(args.name)  # before asking for a password
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            raise ConfigError("the two passwords differ; nothing was changed")
    new = add_user(args.file, args.name, password, role=args.role)
    print(f"dhumor users: {'added' if new else 'updated'} {args.name} ({args.role}) in {args.file}", file=sys.stderr)
    return EXIT_OK


def cmd_merge(args) -> int:
    from dhumor.inference.merge import merge_results

    n = merge_results(args.inputs, args.out)
    print(f"dhumor merge: {n} rows -> {args.out}", file=sys.stderr)
    return EXIT_OK


def cmd_ocr(args) -> int:
    from dhumor.cache import StageCache
    from dhumor.inference.items import collect_items
    from dhumor.ocr import OCR
    from dhumor.inference.preflight import check_input, check_ocr
    from dhumor.inference.results_file import dumps_row

    source = check_input(args.input)
    check_ocr(args.ocr)
    ocr = OCR(args.ocr, StageCache(args.cache))
    from dhumor.ocr import OCRFailed

    failed = 0
    for it in collect_items(source)[: args.limit]:
        # One input's failure is that input's row: its file, its decode, the engine on this image.
        try:
            if it.error:
                raise DataError(it.path, it.error)
            text = ocr.read_file(it.path)
            print(dumps_row({"id": it.id, "path": str(it.path), "text": text}), flush=True)
            continue
        except OCRFailed as e:
            error, kind = f"OCR failed: {e}", e.kind
        except DataError as e:
            error, kind = str(e), "permanent"
        except OSError as e:
            error, kind = f"cannot read file: {e.strerror or e}", "permanent"
        except MemoryError as e:
            error, kind = f"out of memory: {e}", "transient"
        failed += 1
        print(dumps_row({"id": it.id, "path": str(it.path), "error": error, "error_kind": kind}), flush=True)
    return EXIT_ROWS_FAILED if failed else EXIT_OK


COMMANDS = {"data": cmd_data, "evaluate": cmd_evaluate, "score": cmd_score, "explain": cmd_explain,
            "demo": cmd_demo, "merge": cmd_merge, "ocr": cmd_ocr, "reviews": cmd_reviews,
            "users": cmd_users}


def _debug_wanted(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("DHUMOR_DEBUG", "") not in ("", "0")


def _report(command: str, e: BaseException, debug: bool) -> int:
    """One line for an error a user can fix (exit 2); a short note for a bug (exit 1)."""
    if debug:
        import traceback

        traceback.print_exception(e)
    # Only the project's own errors are the user's to fix: a ValueError from numpy or sklearn is a bug.
    if isinstance(e, DHumorError):
        msg = str(e).strip().splitlines()
        print(f"dhumor {command}: error: {msg[0] if len(msg) == 1 else ' / '.join(msg[:6])}", file=sys.stderr)
        return EXIT_USAGE
    print(f"dhumor {command}: internal error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''} "
          f"(rerun with --debug for the traceback, and please report it)", file=sys.stderr)
    return EXIT_INTERNAL


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler, `kill`, a container stop) ends a run like Ctrl-C: finished rows are written,
    the summary printed, exit 130; not a silent death that drops what is done but not yet written."""
    import signal
    import threading

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield  # not ours to change (a thread, or an embedding program with its own handler)
        return
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """The ``dhumor`` command; returns its exit code (see the parser's epilog)."""
    from_process = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    _setup_logging()
    debug = _debug_wanted(argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        argv = [a for a in argv if a != "--debug"]
        if from_process:  # LightningCLI reads sys.argv itself; handing it the same list again draws a warning
            sys.argv[1:] = argv
        try:
            run_lightning(None if from_process else argv)
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except Exception as e:
            return _report(argv[0], e, debug)
        return EXIT_OK
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"  # every progress bar, the libraries' included
    try:
        with _sigterm_interrupts():
            return COMMANDS[args.command](args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as e:
        return _report(args.command, e, debug)
    finally:
        from dhumor.inference.results_file import release_output_locks

        release_output_locks()  # the output is free for the next run as soon as this command ends


if __name__ == "__main__":
    sys.exit(main())
