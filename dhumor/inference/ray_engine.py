"""``dhumor score --engine ray``: batch scoring on Ray Data, from one laptop to a cluster.

Stages, each sized to its resource (Ray Data streams blocks between them and back-pressures):

1. read bytes + decode + OCR: CPU tasks (:func:`preprocess_batch`, ``--ray-ocr-cpus`` each);
2. explanation (optional): an actor pool calling the explanation backend, ``--ray-explain-actors``
   actors each with the backend's own bounded concurrency (an OpenAI-compatible server such as vLLM);
3. features + TCRNet + calibration + decision: an actor pool (:class:`ModelStage`) holding the same
   :class:`~dhumor.inference.pipeline.Pipeline` as ``dhumor score`` (checkpoint, calibration, thresholds), one
   GPU per actor when the cluster has GPUs;
4. rows: the driver writes them to a :class:`~dhumor.inference.parquet_results.ParquetResults`
   dataset, the only writer, so a retried task or a restarted actor can never write a row twice.

Stage code is the scorer's own (``Pipeline.preprocess``, ``Pipeline.explain``, ``Pipeline.process``),
so a meme gets the same row on both engines. Ray restarts dead actors and retries their batches, and
retries tasks whose worker died; a killed driver loses only rows not yet in a part, which the rerun
(the same command) computes, as ``dhumor score`` does after SIGKILL.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import pickle
import socket
import threading
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from dhumor.errors import ConfigError, DataError
from dhumor.inference.sources import is_url

log = logging.getLogger("dhumor")

PART_ROWS = 2048  # rows per Parquet part (fewer, larger files than one per batch)
# ...but at least every this many seconds, so a killed driver loses little work
PART_SECONDS = float(os.environ.get("DHUMOR_RAY_PART_SECONDS", "10"))
RAY_EXTRA = "pip install 'dhumor[ray]'"


# ---------------------------------------------------------------- settings checked before anything loads
def check_ray_installed() -> None:
    missing = [m for m in ("ray", "pyarrow", "fsspec") if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"--engine ray needs {', '.join(missing)}: {RAY_EXTRA} (or score without --engine ray)")
    if importlib.util.find_spec("ray.data") is None:
        raise ConfigError(f"--engine ray needs Ray Data: {RAY_EXTRA}")


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """A ``ray://HOST:PORT`` or ``HOST:PORT`` address answers on TCP (``auto`` is checked when connecting)."""
    if address in (None, "", "auto", "local"):
        return
    hostport = address.split("://", 1)[1] if "://" in address else address
    if address.startswith("://") or ("://" in address and not address.startswith("ray://")):
        raise ConfigError(f"--ray-address {address}: give auto, ray://HOST:PORT (Ray Client) or HOST:PORT (the head's "
                          f"GCS)")
    host, _, port = hostport.rstrip("/").rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address {address}: expected ray://HOST:PORT or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--ray-address {address}: cannot reach it ({e.strerror or e}); is the Ray head running "
                          f"(`ray start --head`) and the port open?") from None


def connect(address: str | None, quiet: bool = True) -> dict:
    """Start a local Ray instance (``address`` None) or join a cluster; the cluster's resources."""
    import ray

    check_address(address)
    kwargs = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=not quiet,
                  configure_logging=True)
    try:
        if address in (None, "", "local"):
            ray.init(**kwargs)
        else:
            ray.init(address=address, **{k: v for k, v in kwargs.items() if k != "include_dashboard"})
    except ConnectionError as e:
        raise ConfigError(f"--ray-address {address}: {str(e).splitlines()[0]} (start one with `ray start --head`, or "
                          f"leave out --ray-address for a local instance)") from None
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # ours counts rows; Ray Data's per-operator bars would interleave
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return dict(ray.cluster_resources())


class RayStarter:
    """Connect to Ray on a thread, so that starting a local instance (seconds) overlaps the driver's own
    checks and listing; :meth:`wait` gives the cluster's resources or raises what connecting raised.

    The thread lives until :meth:`stop`: Ray's local processes are started with a parent-death signal,
    which Linux sends when the *thread* that started them ends, not the process."""

    def __init__(self, address: str | None, quiet: bool = True, start: bool = True):
        self.address, self.quiet = address, quiet
        self._resources: dict | None = None
        self._error: BaseException | None = None
        self._ready, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="ray-start", daemon=True)
        if start:
            self._thread.start()

    def _run(self) -> None:
        try:
            self._resources = connect(self.address, self.quiet)
        except BaseException as e:  # handed to the main thread by wait()
            self._error = e
        self._ready.set()
        self._release.wait()  # keep Ray's local processes alive (see the class doc)

    def wait(self) -> dict:
        if self._thread.ident is None:  # not started early: connect now, on this thread
            self._resources = connect(self.address, self.quiet)
        else:
            self._ready.wait()
        if self._error is not None:
            raise self._error
        return self._resources or {}

    def stop(self) -> None:
        """Shut Ray down if this driver started or joined it (waits for a connection in progress)."""
        if self._thread.ident is not None:
            self._ready.wait()
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self._release.set()


# ---------------------------------------------------------------- stage 1: read + decode + OCR (CPU tasks)
_WORKER: dict = {}  # per worker process: the OCR engine, made once (Ray reuses worker processes across tasks)


def _reader(ocr_engine: str, cache_path: str | None) -> SimpleNamespace:
    key = (ocr_engine, cache_path)
    if key not in _WORKER:
        from dhumor.cache import StageCache
        from dhumor.ocr import create_ocr

        _WORKER[key] = SimpleNamespace(ocr=create_ocr(ocr_engine, StageCache(cache_path)))
    return _WORKER[key]


def preprocess_batch(batch: dict, ocr_engine: str, cache_path: str | None) -> dict:
    """``Pipeline.preprocess`` (decode, sha256, OCR) on a batch of pickled items; URLs are read through fsspec."""
    from dhumor.images import decode_image, sha256_bytes
    from dhumor.inference.prepare import PERMANENT, TRANSIENT, Prepared, preprocess
    from dhumor.inference.sources import read_url_bytes

    # The same preprocess as `dhumor score` (decode, sha256, OCR), without loading a model here.
    reader = _reader(ocr_engine, cache_path)
    out = []
    for blob in batch["item"]:
        item = pickle.loads(blob)
        if is_url(item.path) and not item.error:
            t = time.perf_counter()
            try:
                data = read_url_bytes(item.path)
                image, sha256 = decode_image(data, item.path), sha256_bytes(data)
            except DataError as e:
                # A network failure is worth retrying on the next run; a bad file is not.
                kind = TRANSIENT if e.reason.startswith("cannot read file:") else PERMANENT
                p = Prepared(item, error=e.reason, error_kind=kind)
                p.timings["decode"] = time.perf_counter() - t
                out.append(pickle.dumps(p))
                continue
            decode = time.perf_counter() - t
            p = preprocess(item, reader.ocr, image, sha256)
            p.timings = {"decode": decode, **p.timings}
        else:
            p = preprocess(item, reader.ocr)
        out.append(pickle.dumps(p))
    return {"prepared": np.array(out, dtype=object)}


# ---------------------------------------------------------------- stage 2: explanations (optional actor pool)
class ExplainStage:
    """``Pipeline.explain`` on each batch, with the explainer built once per actor."""

    def __init__(self, spec: dict, cache_path: str | None, streams: list[str]):
        from dhumor.cache import StageCache
        from dhumor.explain import create_explainer

        self.explainer = create_explainer(cache=StageCache(cache_path), **spec)
        self.streams = streams  # Pipeline.explain reads self.explainer and self.streams

    def __call__(self, batch: dict) -> dict:
        from dhumor.inference.pipeline import Pipeline

        from dhumor.inference.prepare import explainer_provenance

        prepared = [pickle.loads(b) for b in batch["prepared"]]
        Pipeline.explain(self, prepared)
        # The model actors have no explainer: each row's provenance takes this stage's settings with it.
        who = json.dumps(explainer_provenance(self.explainer.settings))
        return {"prepared": np.array([pickle.dumps(p) for p in prepared], dtype=object),
                "explainer": np.array([who] * len(prepared), dtype=object)}


# ---------------------------------------------------------------- stage 3: features + model + decision (actor pool)
class ModelStage:
    """The scorer's ``Pipeline`` in an actor: features (stage cache), TCRNet, calibration, decision → row JSON."""

    def __init__(self, checkpoint: str, cache_path: str | None, device: str, threshold: float | None,
                 ocr_engine: str = "none", decision: dict | None = None):
        from dhumor.cache import StageCache
        from dhumor.inference.pipeline import Pipeline
        from dhumor.ocr import create_ocr

        # The OCR engine ran upstream (it loads only if used: never here); the pipeline names it in every
        # row's provenance, as `dhumor score`'s does.
        cache = StageCache(cache_path)
        self.pipe = Pipeline.from_checkpoint(checkpoint, cache=cache, device=device, threshold=threshold,
                                             progress=False, ocr=create_ocr(ocr_engine, cache), **(decision or {}))

    def __call__(self, batch: dict) -> dict:
        from dhumor.inference.results_file import dumps_row

        prepared = [pickle.loads(b) for b in batch["prepared"]]
        st = self.pipe.extractor.stats
        cached, computed = st.cached, st.computed
        rows = self.pipe.process(prepared, None)  # the threshold is the pipeline's, as in Scorer
        if "explainer" in batch:
            for r, who in zip(rows, batch["explainer"]):
                r["provenance"]["explainer"] = json.loads(who)
        n = len(rows)
        hits = np.zeros(n, dtype=np.int64)
        comp = np.zeros(n, dtype=np.int64)
        if n:
            hits[0], comp[0] = st.cached - cached, st.computed - computed
        return {"row": np.array([dumps_row(r) for r in rows], dtype=object), "cached": hits, "computed": comp}


# ---------------------------------------------------------------- the run
@dataclass
class RaySettings:
    """What a cluster user sets; the defaults suit one machine."""

    address: str | None = None
    batch_size: int = 16  # memes per block: per OCR task and per model call
    model_actors: int | None = None  # default: one per GPU, else one
    gpus_per_actor: float | None = None  # default: 1 when the cluster has GPUs, else 0
    model_cpus: float = 1.0
    ocr_cpus: float = 1.0
    explain_actors: int = 1


def _resolve(settings: RaySettings, resources: dict) -> tuple[int, float]:
    gpus = float(resources.get("GPU", 0))
    per = settings.gpus_per_actor if settings.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    actors = settings.model_actors or (max(1, int(gpus // per)) if per else 1)
    return actors, per


def build_dataset(items: list, settings: RaySettings, checkpoint: str, cache_path: str | None, ocr: str,
                  device: str, threshold: float | None, resources: dict, explain_spec: dict | None = None,
                  streams: list[str] | None = None, decision: dict | None = None):
    """The Ray Data pipeline for ``items`` (lazy; iterate it to run)."""
    import ray

    bs = max(1, settings.batch_size)
    ds = ray.data.from_items([{"item": pickle.dumps(it)} for it in items],
                             override_num_blocks=max(1, math.ceil(len(items) / bs)))
    with warnings.catch_warnings():
        # ray_remote_args_fn is deprecated from Ray 2.60 (removed in 2.64, hence the extra's upper bound);
        # it is the one way that keeps this stage a stage of its own on every Ray version we support.
        warnings.filterwarnings("ignore", message=".*ray_remote_args_fn.*")
        ds = ds.map_batches(preprocess_batch, fn_kwargs={"ocr_engine": ocr, "cache_path": cache_path},
                            batch_size=bs, batch_format="numpy",
                            # Given as a function, the resources also keep Ray Data from fusing this CPU stage
                            # into the model actors: OCR has to scale out on CPU tasks, not queue in a GPU actor.
                            ray_remote_args_fn=lambda: {"num_cpus": settings.ocr_cpus})
    actors, per = _resolve(settings, resources)
    explainers = max(1, settings.explain_actors) if explain_spec is not None else 0
    # An openai-compatible backend waits on a server: its actors hold no CPU. The offline one computes.
    explain_cpus = 0.0 if (explain_spec or {}).get("name") == "openai" else 1.0
    model_cpus = settings.model_cpus
    # Actors hold their CPUs for the whole run: if they left less than one decode task's worth, no decode
    # task could ever start (a deadlock on a small machine). Shrink the actors' share to fit.
    total = float(resources.get("CPU", 0)) or 1.0
    held = actors * model_cpus + explainers * explain_cpus
    if held and total - held < settings.ocr_cpus:
        scale = max(0.0, total - settings.ocr_cpus) / held
        if scale * min(model_cpus, explain_cpus or model_cpus) < 0.05:
            raise ConfigError(f"the cluster has {total:g} CPUs: too few for {actors} model actor(s)"
                              + (f", {explainers} explanation actor(s)" if explainers else "")
                              + f" and decode tasks of {settings.ocr_cpus:g} CPU; lower --ray-model-actors"
                              + (" / --ray-explain-actors" if explainers else "") + " or --ray-ocr-cpus")
        model_cpus, explain_cpus = model_cpus * scale, explain_cpus * scale
    if explain_spec is not None:
        ds = ds.map_batches(ExplainStage, fn_constructor_kwargs={"spec": explain_spec, "cache_path": cache_path,
                                                                   "streams": streams or []},
                            batch_size=bs, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=max(1, settings.explain_actors)),
                            num_cpus=explain_cpus)
    ds = ds.map_batches(ModelStage, fn_constructor_kwargs={"checkpoint": checkpoint, "cache_path": cache_path,
                                                            "device": device, "threshold": threshold,
                                                            "ocr_engine": ocr, "decision": decision},
                        batch_size=bs, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=actors),
                        num_gpus=per or None,
                        num_cpus=model_cpus)
    return ds


def run(items: list, results, settings: RaySettings, checkpoint: str, schema, cache_path: str | None,
        ocr: str, device: str = "auto", threshold: float | None = None, retry_errors: bool = False,
        progress: bool = True, explain_spec: dict | None = None, streams: list[str] | None = None,
        starter: RayStarter | None = None, provenance: dict | None = None, rescore: bool = False,
        decision: dict | None = None):
    """Score ``items`` on Ray into ``results`` (a :class:`ParquetResults`); a :class:`~dhumor.inference.scoring.ScoreSummary`.

    The same bookkeeping as :meth:`dhumor.inference.scoring.Scorer.run`: ids already in the dataset are skipped,
    rows with a transient error (all error rows with ``retry_errors``) are redone; rows written with other
    settings than ``provenance`` (:func:`~dhumor.inference.scoring.planned_provenance`) are refused, or
    scored again with ``rescore``. ``decision``: the unfamiliarity flags of the model actors' pipeline."""
    from tqdm.auto import tqdm

    from dhumor.inference.parquet_results import arrow_id
    from dhumor.inference.results_file import check_provenance, provenance_key, row_info
    from dhumor.inference.scoring import ScoreSummary, _needs_redo, tally

    summary = ScoreSummary(total=len(items))
    t0 = time.perf_counter()
    results.repair()
    wanted = {arrow_id(it.id) for it in items}
    every = results.rows()
    stale: set[str] = set()
    if provenance is not None:  # a resumed dataset never mixes two models' or two policies' rows
        index = {r["id"]: row_info(r, provenance_key(r["provenance"]) if isinstance(r.get("provenance"), dict)
                                   else None) for r in every}
        fields = tuple(k for k in provenance if k != "explainer") if explain_spec is not None else None
        mine = provenance if explain_spec is not None else {**provenance, "explainer": None}
        stale = check_provenance(results, index, mine, rescore, fields=fields)
    previous = {r["id"]: r for r in every if r["id"] in wanted}
    redo = {i for i, r in previous.items() if _needs_redo(row_info(r), retry_errors)} | (stale & set(previous))
    if redo:
        results.drop_ids(redo)
        summary.redone = len(redo)
    todo = [it for it in items if arrow_id(it.id) not in previous or arrow_id(it.id) in redo]
    summary.already_done = len(items) - len(todo)
    results.start()
    hits, resources = Counter(), {}
    clock: dict = {}  # when Ray was up, the first and the last rows came (written to _SUCCESS, for benchmarks)
    if todo:
        starter = starter or RayStarter(settings.address, quiet=not progress, start=False)
        bar = tqdm(total=len(todo), desc="scoring (ray)", unit="meme", disable=not progress)
        pending: list[dict] = []
        last_write = time.monotonic()
        try:
            resources = starter.wait()
            clock["ray_started_s"] = round(time.perf_counter() - t0, 2)
            ds = build_dataset(todo, settings, checkpoint, cache_path, ocr, device, threshold, resources,
                               explain_spec, streams, decision)
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                rows = [json.loads(s) for s in batch["row"]]
                clock.setdefault("first_rows_s", round(time.perf_counter() - t0, 2))
                clock.setdefault("first_rows", len(rows))
                clock["last_rows_s"] = round(time.perf_counter() - t0, 2)
                hits["features"] += int(batch["cached"].sum())
                hits["computed"] += int(batch["computed"].sum())
                summary.count(rows)
                pending += rows
                if len(pending) >= PART_ROWS or time.monotonic() - last_write >= PART_SECONDS:
                    results.append(pending)
                    pending, last_write = [], time.monotonic()
                bar.update(len(rows))
        except KeyboardInterrupt:
            summary.interrupted = True  # rows received so far are written below; a rerun continues
        finally:
            results.append(pending)  # whole rows only; an interrupted run keeps what it computed
            bar.close()
            starter.stop()
    summary.seconds = round(time.perf_counter() - t0, 2)
    summary.cache_hits = {"features": hits["features"], "computed": hits["computed"]}
    final = [r for r in results.rows() if r["id"] in wanted]
    tally(final, schema, False, summary)  # the same counts as Scorer's
    if not summary.interrupted and len(final) == len(wanted):
        results.finish({**summary.to_dict(), "ray": {**clock, "resources": resources}})
    return summary


# ---------------------------------------------------------------- the command
def score_command(args) -> int:
    """``dhumor score ... --engine ray``: every check first (exit 2 in one line), then the run, then the summary."""
    from dhumor.inference.preflight import check_explainer, check_input, check_ocr
    from dhumor.inference.parquet_results import ParquetResults, check_parquet_out
    from dhumor.inference.items import parse_shard
    from dhumor.inference.sources import check_url

    check_parquet_out(args.out)
    check_ray_installed()
    results = ParquetResults(args.out).lock()  # a second run on the same dataset is refused now
    check_address(args.ray_address)
    parse_shard(args.shard)
    if is_url(args.input):
        check_url(args.input)
    else:
        check_input(args.input)
    check_ocr(args.ocr)
    check_explainer(args.explain, args.explain_model, args.base_url)
    # Everything cheap is checked: Ray starts now, while the checkpoint is checked and the input listed.
    # A complete dataset is most likely a rerun with nothing to do: Ray is started only if needed.
    starter = RayStarter(args.ray_address, quiet=args.quiet, start=not results.complete())
    try:
        return _score(args, results, starter)
    finally:
        starter.stop()


def _score(args, results, starter: RayStarter) -> int:
    from dhumor.inference.items import collect_items, in_shard, parse_shard
    from dhumor.inference.preflight import check_checkpoint, check_input
    from dhumor.schema import TaskSchema
    from dhumor.inference.sources import collect_url_items

    shard = parse_shard(args.shard)
    ckpt, meta = check_checkpoint(args.checkpoint)
    if is_url(args.input):
        items = collect_url_items(args.input)
        source = args.input
    else:
        source = check_input(args.input)
        out = Path(args.out).resolve()
        lock = out.with_name(out.name + ".lock")
        items = [it for it in collect_items(source, args.format, args.images)  # never the run's own output
                 if out not in Path(os.path.abspath(it.path)).parents and Path(os.path.abspath(it.path)) != lock]
    items = [it for it in items if in_shard(it.id, shard)]
    schema = TaskSchema.from_dict(meta["schema"])
    explain_spec = None
    if args.explain != "none":
        explain_spec = dict(name=args.explain, iterations=args.iterations,
                            similarity_threshold=args.similarity_threshold, model=args.explain_model,
                            base_url=args.base_url, threads=args.threads)
    settings = RaySettings(address=args.ray_address, batch_size=args.ray_batch_size or args.batch_size,
                           model_actors=args.ray_model_actors, gpus_per_actor=args.ray_gpus_per_actor,
                           ocr_cpus=args.ray_ocr_cpus, explain_actors=args.ray_explain_actors)
    cache_path = str(Path(args.cache).expanduser().resolve()) if args.cache else os.environ.get("DHUMOR_CACHE")
    from dhumor.inference.scoring import planned_provenance

    unfamiliar = {"on_unfamiliar": args.on_unfamiliar, "ood_threshold": args.ood_threshold,
                  "abstain_uncertain": args.abstain_uncertain}
    planned = planned_provenance(ckpt, meta, args.decision_threshold, args.ocr, **unfamiliar)
    summary = run(items, results, settings, str(ckpt), schema, cache_path, args.ocr, device=args.device,
                  threshold=args.decision_threshold, retry_errors=args.retry_errors, progress=not args.quiet,
                  explain_spec=explain_spec, streams=(meta.get("hparams") or {}).get("streams"), starter=starter,
                  provenance=planned, rescore=args.rescore, decision=unfamiliar)
    return summary.report(source, args.out)
