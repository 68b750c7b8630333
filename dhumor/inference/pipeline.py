"""meme → decision: the one inference path of ``score``, ``evaluate``, ``predict``'s writer, the demo
and the notebook, in the shape of a transformers pipeline.

- :meth:`Pipeline.preprocess`: decode the file (and its sha256), read the caption (OCR) when none
  is given; then :meth:`Pipeline.explain` runs the explainer over a batch when one is configured.
- :meth:`Pipeline.forward`: stream features through the stage cache and the model, batched, then
  the checkpoint's calibration.
- :meth:`Pipeline.postprocess`: labels, gating and the decision (:class:`~dhumor.inference.decision.Decider`).

A failure that belongs to one meme becomes that meme's ``error`` (or ``explanation_error``) and the
batch goes on: its file or its decode, an image the OCR engine cannot read (``error_kind``
"permanent": a rerun gives the same, so it is not retried), the explanation server, running out of
memory ("transient": retried by the next run). Anything else is a bug and stops the run. Every row
records its ``provenance``: the checkpoint's digest, the threshold, the OCR engine and the explainer.

>>> from dhumor.inference.pipeline import Pipeline
>>> pipe = Pipeline.from_checkpoint()                          # doctest: +SKIP
>>> r = pipe.score_file("examples/chelsea.jpg")                 # doctest: +SKIP
>>> r["tasks"]["harmful"]["label"], r["decision"]["flagged"]    # doctest: +SKIP
('no', False)
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from dhumor.cache import StageCache
from dhumor.data.datasets import feature_collate
from dhumor.encoders.features import FeatureExtractor, StreamFeature, resolve_device
from dhumor.errors import CheckpointError, DataError
from dhumor.inference.decision import Decider
from dhumor.inference.items import Item
# The first stage lives in a module that imports no torch (Ray's decode workers, `explain`); its names
# are the pipeline's too.
from dhumor.inference.prepare import (EXPLAINER_FAULTS, PERMANENT, TRANSIENT, Prepared,  # noqa: F401
                                      _describe_exception, explainer_provenance, is_permanent, preprocess)
from dhumor.model.loading import load_module
from dhumor.model.ood import Embeddings, OODScorer, forward_embed, to_embeddings
from dhumor.resources import default_checkpoint
from dhumor.schema import Meme, TaskSchema
from dhumor.util.files import file_sha256

log = logging.getLogger("dhumor")


@dataclass
class Predictions:
    """Class probabilities per task for the memes that could be scored; errors for the others."""

    probs: dict[str, np.ndarray]  # task -> (N_kept, C)
    kept: list[int]  # indices into the input memes
    errors: dict[int, DataError] = field(default_factory=dict)


class Pipeline:
    """Checkpoint + frozen encoders (+ optional OCR and explainer) → calibrated probabilities and a decision."""

    def __init__(self, module, extractor: FeatureExtractor, ocr=None, explainer=None, decider: Decider | None = None,
                 checkpoint: str | None = None, ood: OODScorer | None = None, ood_threshold: float | None = None):
        self.module, self.extractor = module.eval(), extractor
        self.ocr, self.explainer = ocr, explainer
        self.schema: TaskSchema = module.schema
        self.streams: list[str] = module.stream_names
        self.decider = decider or Decider.from_module(module)
        self.checkpoint = checkpoint
        self.meta: dict = getattr(module, "checkpoint_meta", None) or {}
        self.checkpoint_digest: str | None = None
        if checkpoint:
            from dhumor.model.checkpoint import checkpoint_digest

            self.checkpoint_digest = checkpoint_digest(checkpoint)
        self.ood = ood  # the unfamiliarity scorer (dhumor.model.ood); None: rows carry "ood": null
        self.ood_threshold = ood_threshold if ood_threshold is not None else (ood.threshold if ood else None)
        self._check_reasoning_source()

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, cache: str | Path | StageCache | None = None,
                        device: str = "auto", progress: bool = False, ocr=None, explainer=None,
                        threshold: float | None = None, batch_size: int = 32, on_unfamiliar: str = "abstain",
                        ood_threshold: float | None = None, abstain_uncertain: bool = False) -> "Pipeline":
        """Load a checkpoint (default: the shipped one) with its encoders, the stage cache and its decider.
        ``threshold`` overrides the checkpoint's balanced preset for the primary task; ``on_unfamiliar``,
        ``ood_threshold`` and ``abstain_uncertain``: see :class:`~dhumor.inference.decision.Decider` and
        :mod:`dhumor.model.ood`."""
        path = Path(checkpoint) if checkpoint else default_checkpoint()
        dev = resolve_device(device)
        module = load_module(path, map_location=dev)
        hp = module.hparams
        names = {s: hp[f"{s}_encoder"] for s in module.stream_names}
        modules, salt = None, ""
        if hp.get("mode") == "finetune":
            # Fine-tuned encoders live in the checkpoint; their features must not mix with pretrained ones.
            modules = {names[s]: module.encoder_for(names[s]) for s in module.stream_names}
            salt = _weights_digest(path)
        store = cache if isinstance(cache, StageCache) else StageCache(cache)
        extractor = FeatureExtractor(names, store, device=str(dev), progress=progress, modules=modules,
                                     salt=salt, batch_size=batch_size,
                                     max_tokens={s: hp.get("max_tokens", 128) for s in ("caption", "reasoning")})
        decider = Decider.from_module(module, threshold, on_unfamiliar, abstain_uncertain)
        return cls(module, extractor, ocr=ocr, explainer=explainer, decider=decider, checkpoint=str(path),
                   ood=load_ood(path, module.checkpoint_meta), ood_threshold=ood_threshold)

    # ------------------------------------------------------------ settings
    @property
    def thresholds(self) -> dict[str, float]:
        """The threshold in use per binary decision task (the primary task)."""
        return {self.schema.primary: self.decider.threshold}

    @property
    def presets(self) -> dict[str, float]:
        return self.decider.presets

    def provenance(self, threshold: float | None = None) -> dict:
        """The settings that shape a row: checkpoint digest, threshold in use, OCR engine, explainer."""
        return {"checkpoint": self.checkpoint_digest,
                "threshold": float(self.decider.threshold if threshold is None else threshold),
                "ocr": self.ocr.engine if self.ocr is not None else "none",
                "explainer": explainer_provenance(self.explainer.settings) if self.explainer is not None else None,
                # what decides abstention: a resumed file never mixes two policies
                "unfamiliar": {"threshold": self.ood_threshold, "on_unfamiliar": self.decider.on_unfamiliar,
                               "uncertain_margin": self.decider.uncertain_margin}}

    def reasoning_source(self) -> dict:
        """Where this pipeline's reasoning-stream text comes from."""
        if self.explainer is None:
            return {"kind": "none"}
        s = self.explainer.settings
        return {"kind": "explanations", "backend": s.get("backend"), "model": s.get("model"),
                "prompt_version": s.get("prompts")}

    def _check_reasoning_source(self) -> None:
        if "reasoning" not in self.streams:
            return
        trained = self.meta.get("reasoning_source") or {}
        used = self.reasoning_source()
        if not trained:
            if used["kind"] == "none":
                log.warning("%s has a reasoning stream but no explainer is configured: the stream is absent for "
                            "every meme (pass --explain BACKEND to feed it)", self.checkpoint)
            return
        # ``used`` is either no explanations or generated ones: a dataset column never matches it.
        differs = [k for k in ("backend", "model", "prompt_version")
                   if trained.get(k) is not None and used.get(k) is not None and trained.get(k) != used.get(k)]
        if trained.get("kind") != used["kind"] or differs:
            log.warning("the reasoning stream of %s was trained on %s; this run feeds it %s: expect different "
                        "predictions", self.checkpoint, _source_text(trained), _source_text(used))

    # ------------------------------------------------------------ stages
    def preprocess(self, item: Item, image: Image.Image | None = None, sha256: str | None = None) -> Prepared:
        """Decode the image (unless given) and read its caption (unless given). Thread-safe."""
        return preprocess(item, self.ocr, image, sha256)

    def explain(self, prepared: Sequence[Prepared]) -> None:
        """Explain, in one batch, the memes that have no explanation yet (when an explainer is configured).

        A failed explanation is the row's ``explanation_error``; when the model reads the reasoning
        stream it is also the row's ``error`` (the model cannot decide without it)."""
        todo = [p for p in prepared if p.error is None and p.explanation is None]
        if self.explainer is None or not todo:
            return
        t = time.perf_counter()
        try:
            results = self.explainer.explain_many([p.image for p in todo], [p.sha256 for p in todo],
                                                  [p.caption or "" for p in todo])
        except EXPLAINER_FAULTS as e:  # the server or the backend broke: every meme of the batch records why
            log.warning("explainer failed on a batch of %d: %s", len(todo), _describe_exception(e))
            results = [e] * len(todo)
        per = (time.perf_counter() - t) / len(todo)
        for p, r in zip(todo, results):
            p.timings["explain"] = per
            if isinstance(r, BaseException):
                p.explanation_error = f"explanation failed: {_describe_exception(r)}"
            else:
                p.trail = r.to_dict()
                if r.ok:
                    p.explanation = r.text
                else:
                    p.explanation_error = f"explanation failed: {r.to_dict().get('error') or r.stop_reason}"
            if p.explanation_error and "reasoning" in self.streams:
                p.error, p.error_kind = p.explanation_error, TRANSIENT

    def features(self, prepared: Sequence[Prepared]) -> list[dict[str, StreamFeature | None]]:
        """Per-meme stream features (through the stage cache)."""
        feats: list[dict] = [{} for _ in prepared]
        if "image" in self.streams:
            for f, v in zip(feats, self.extractor.image_features_from_pil([p.image for p in prepared],
                                                                           [p.sha256 for p in prepared])):
                f["image"] = v
        for stream, attr in (("caption", "caption"), ("reasoning", "explanation")):
            if stream in self.streams:
                for f, v in zip(feats, self.extractor.text_features(stream, [getattr(p, attr) for p in prepared])):
                    f[stream] = v
        return feats

    def forward_features(self, feats: Sequence[dict[str, StreamFeature | None]],
                         batch_size: int = 256) -> dict[str, np.ndarray]:
        """Calibrated class probabilities per task for precomputed stream features."""
        return self.score_features(feats, batch_size)[0]

    def score_features(self, feats: Sequence[dict[str, StreamFeature | None]],
                       batch_size: int = 256) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """Calibrated class probabilities per task, and the unfamiliarity score per meme (None when the
        checkpoint has no statistics), for precomputed stream features: one forward pass for both."""
        probs, emb = self.embed_features(feats, batch_size)
        if self.ood is None:
            return probs, None
        return probs, (self.ood.score(emb) if len(emb) else np.zeros(0))

    @torch.inference_mode()
    def embed_features(self, feats: Sequence[dict[str, StreamFeature | None]],
                       batch_size: int = 256) -> tuple[dict[str, np.ndarray], Embeddings]:
        """Calibrated class probabilities per task and what the unfamiliarity score reads
        (:class:`~dhumor.model.ood.Embeddings`) for precomputed stream features."""
        collate = feature_collate(self.schema, {s: self.module.hparams["input_dims"][s] for s in self.streams},
                                  self.module.hparams.get("inputs") == "tokens")
        out: dict[str, list[np.ndarray]] = {t.name: [] for t in self.schema.tasks}
        parts: list[Embeddings] = []
        dev = self.module.device
        for b in range(0, len(feats), batch_size):
            items = [{"meme": Meme(id=str(i), image=None), "features": f} for i, f in enumerate(feats[b:b + batch_size])]
            batch = collate(items)
            batch["streams"] = {s: {k: v.to(dev) for k, v in d.items()} for s, d in batch["streams"].items()}
            logits, raw = forward_embed(self.module, batch)  # the same numbers as self.module(batch)
            for task, lg in logits.items():
                out[task].append(lg.float().softmax(-1).cpu().numpy())
            parts.append(to_embeddings(raw, logits[self.schema.primary]))
        probs = {t: np.concatenate(v) if v else np.zeros((0, self.schema.task(t).num_classes)) for t, v in out.items()}
        return self.decider.calibrate(probs), Embeddings.concat(parts)

    def forward(self, prepared: Sequence[Prepared]) -> dict[str, np.ndarray]:
        """Calibrated probabilities for memes that passed preprocessing (features, then the model)."""
        t = time.perf_counter()
        feats = self.features(prepared)
        t_feat = (time.perf_counter() - t) / max(1, len(prepared))
        t = time.perf_counter()
        probs, scores = self.score_features(feats)
        t_model = (time.perf_counter() - t) / max(1, len(prepared))
        for k, p in enumerate(prepared):  # batch time shared out per meme
            p.timings.update(features=t_feat, model=t_model)
            p.ood = None if scores is None else self.ood.decide(scores[k:k + 1], self.ood_threshold)[0]
        return probs

    def postprocess(self, p: Prepared, probs: dict[str, np.ndarray] | None, threshold: float | None = None) -> dict:
        """The result row of one meme: identity, caption, labels and decision (or the error), explanation, timings."""
        row = {"id": p.item.id, "path": str(p.item.path), "sha256": p.sha256, "caption": p.caption,
               "caption_source": p.caption_source, "tasks": None, "decision": None, "ood": None,
               "explanation": p.explanation, "explanation_trail": p.trail, "explanation_error": p.explanation_error,
               "error": p.error, "error_kind": p.error_kind}
        if probs is not None and p.error is None:
            row.update(self.decider.describe(probs, threshold, p.ood), ood=p.ood)
        row["timings"] = {k: round(v, 4) for k, v in p.timings.items()}
        row["provenance"] = self.provenance(threshold)
        return row

    # ------------------------------------------------------------ batches
    def process(self, prepared: Sequence[Prepared], threshold: float | None = None) -> list[dict]:
        """Explain, forward and postprocess a batch of preprocessed memes; rows in input order."""
        self.explain(prepared)
        ok = [p for p in prepared if p.error is None]
        probs: dict[int, dict[str, np.ndarray]] = {}
        if ok:
            try:
                batch = self.forward(ok)
                for k, p in enumerate(ok):
                    probs[id(p)] = {t: v[k] for t, v in batch.items()}
            except (MemoryError, torch.OutOfMemoryError) as e:  # one by one: the others still get a row
                log.warning("a batch of %d ran out of memory in the model (%s); scoring its memes one by one",
                            len(ok), _describe_exception(e))
                for p in ok:
                    try:
                        probs[id(p)] = {t: v[0] for t, v in self.forward([p]).items()}
                    except (MemoryError, torch.OutOfMemoryError) as e1:
                        p.error, p.error_kind = f"model failed: out of memory: {_describe_exception(e1)}", TRANSIENT
        return [self.postprocess(p, probs.get(id(p)), threshold) for p in prepared]

    def run(self, items: Iterable[Item], batch_size: int = 16, workers: int = 2,
            threshold: float | None = None) -> Iterator[list[dict]]:
        """Rows for ``items``, one list per batch (decoding and OCR on ``workers`` threads)."""
        items = list(items)
        with ThreadPoolExecutor(max(1, workers)) as pool:
            for b in range(0, len(items), max(1, batch_size)):
                prepared = list(pool.map(self.preprocess, items[b:b + batch_size]))
                yield self.process(prepared, threshold)

    def predict_memes(self, memes: Sequence[Meme], batch_size: int = 64) -> "Predictions":
        """Calibrated probabilities for memes read from a manifest or folder (their captions and
        explanations as given; OCR only for memes without a caption, when configured)."""
        items = [Item(m.id, m.image, m.caption if m.caption is not None or self.ocr is not None else "",
                      m.explanation, labels=dict(m.labels)) for m in memes]
        rows = [r for batch in self.run(items, batch_size=batch_size) for r in batch]
        kept = [i for i, r in enumerate(rows) if not r["error"]]
        errors = {i: DataError(r["path"], r["error"]) for i, r in enumerate(rows) if r["error"]}
        probs = {t.name: np.array([[rows[i]["tasks"][t.name]["probs"][c] for c in t.classes] for i in kept],
                                  dtype=np.float64).reshape(-1, t.num_classes) for t in self.schema.tasks}
        return Predictions(probs, kept, errors)

    # ------------------------------------------------------------ one meme
    def score_file(self, path: str | Path, caption: str | None = None, explanation: str | None = None,
                   threshold: float | None = None) -> dict:
        """Score one image file end to end; raises :class:`DataError` when the file cannot be used."""
        path = Path(path)
        return self._one(self.preprocess(Item(path.name, path, caption, explanation)), path, threshold)

    def score_image(self, img: Image.Image, sha256: str, caption: str | None = None, explanation: str | None = None,
                    name: str = "<image>", threshold: float | None = None) -> dict:
        """Score a decoded image whose file digest is known."""
        item = Item(name, Path(name), caption, explanation)
        return self._one(self.preprocess(item, img, sha256), Path(name), threshold)

    def stream_file(self, path: str | Path, caption: str | None = None,
                    threshold: float | None = None) -> Iterator[dict]:
        """:meth:`score_file`, yielding as it goes when an explainer is configured (the demo's page).

        When the model does not read the explanation, the decision comes first and each finished
        Role-Reversal iteration follows; when it does, each iteration comes as it finishes (decision
        pending) and the decision last. Every yield is a complete result row; the last is final."""
        path = Path(path)
        p = self.preprocess(Item(path.name, path, caption))
        if p.error and p.error_kind == PERMANENT:
            raise DataError(path, p.error)
        if self.explainer is None or p.error:
            yield self.process([p], threshold)[0]
            return
        reads_explanation = "reasoning" in self.streams
        decided = None
        if not reads_explanation:  # decide now: the explanation is shown for review, not used by the model
            p.explanation = ""
            decided = self.process([p], threshold)[0]
            p.explanation = None
            yield {**decided, "explanation": None, "explanation_pending": True}
        t, last = time.perf_counter(), None
        try:
            for last in self.explainer.explain_iter(p.image, p.sha256, p.caption or ""):
                partial = decided or self.postprocess(p, None, threshold)
                yield {**partial, "explanation_trail": last.to_dict(), "explanation_pending": not last.stop_reason}
        except EXPLAINER_FAULTS as e:  # the backend broke: the row says why, as in a batch
            p.explanation_error = f"explanation failed: {_describe_exception(e)}"
        p.timings["explain"] = time.perf_counter() - t
        if last is not None:
            p.trail = last.to_dict()
            if last.ok:
                p.explanation = last.text
            else:
                p.explanation_error = f"explanation failed: {p.trail.get('error') or last.stop_reason}"
        if reads_explanation:
            if p.explanation_error:
                p.error, p.error_kind = p.explanation_error, TRANSIENT
            yield self.process([p], threshold)[0]
        else:
            yield {**decided, "explanation": p.explanation, "explanation_trail": p.trail,
                   "explanation_error": p.explanation_error,
                   "timings": {**decided["timings"], "explain": round(p.timings["explain"], 4)}}

    def _one(self, p: Prepared, path: Path, threshold: float | None) -> dict:
        if p.error and p.error_kind == PERMANENT:
            raise DataError(path, p.error)
        return self.process([p], threshold)[0]


_warned_no_ood: set[str] = set()


def load_ood(path: str | Path, meta: dict | None) -> OODScorer | None:
    """The checkpoint's unfamiliarity scorer; None (warned once per checkpoint) when it has none."""
    entry = (meta or {}).get("ood")
    if not entry:
        if str(path) not in _warned_no_ood:
            _warned_no_ood.add(str(path))
            log.warning("%s has no unfamiliarity statistics: rows carry \"ood\": null and no meme abstains as "
                        "unfamiliar (refit it with `dhumor fit`, or add them with bench/add_ood_stats.py)", path)
        return None
    # A checkpoint that declares statistics it cannot supply (missing, damaged, wrong shapes) is a damaged
    # checkpoint: CheckpointError, exit 2 (deciding without them would silently stop every abstention).
    return OODScorer.load(path, entry)


def _source_text(src: dict) -> str:
    if src.get("kind") == "column":
        return "the dataset's explanation column"
    if src.get("kind") == "explanations":
        return "explanations from " + "/".join(str(src.get(k)) for k in ("backend", "model", "prompt_version")
                                               if src.get(k))
    return "no explanations"


def _weights_digest(path: Path) -> str:
    return file_sha256(path / "model.safetensors" if path.is_dir() else path)[:16]
