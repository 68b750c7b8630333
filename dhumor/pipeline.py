"""image → decision: the one inference path shared by ``evaluate``, ``score`` and the demo.

>>> from dhumor.pipeline import Pipeline
>>> pipe = Pipeline.from_checkpoint()                          # doctest: +SKIP
>>> r = pipe.score_file("examples/chelsea.png")                 # doctest: +SKIP
>>> r["tasks"]["harmful"]["label"], r["decision"]               # doctest: +SKIP
('no', {'task': 'harmful', 'flagged': False, 'threshold': 0.5, 'probability': 0.21})
"""
from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .cache import StageCache
from .checkpoint import load_module
from .decision import describe
from .data.datasets import feature_collate
from .errors import CheckpointError, DataError
from .features import FeatureExtractor, StreamFeature
from .schema import Meme, TaskSchema

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "harmeme-tcrnet"


def default_checkpoint() -> Path:
    """``$DHUMOR_CHECKPOINT``, else the shipped ``checkpoints/harmeme-tcrnet``."""
    p = Path(os.environ.get("DHUMOR_CHECKPOINT", DEFAULT_CHECKPOINT))
    if not p.exists():
        raise CheckpointError(f"{p}: the default checkpoint is missing; pass --checkpoint, or set DHUMOR_CHECKPOINT "
                              f"(the shipped one lives in the repository's checkpoints/ folder)")
    return p


@dataclass
class Predictions:
    """Class probabilities per task for the memes that could be scored; errors for the others."""

    probs: dict[str, np.ndarray]  # task -> (N_kept, C)
    kept: list[int]  # indices into the input memes
    errors: dict[int, DataError] = field(default_factory=dict)


class Pipeline:
    """Checkpoint + frozen encoders (+ optional OCR and explainer) → per-task probabilities and a decision."""

    def __init__(self, module, extractor: FeatureExtractor, ocr=None, explainer=None,
                 thresholds: dict[str, float] | None = None, checkpoint: str | None = None):
        self.module, self.extractor = module.eval(), extractor
        self.ocr, self.explainer = ocr, explainer
        self.schema: TaskSchema = module.schema
        self.streams: list[str] = module.stream_names
        self.thresholds = {self.schema.primary: 0.5, **(thresholds or {})}
        self.checkpoint = checkpoint

    @classmethod
    def from_checkpoint(cls, checkpoint: str | Path | None = None, cache: str | Path | None = None,
                        device: str = "auto", progress: bool = False, ocr=None, explainer=None,
                        thresholds: dict[str, float] | None = None, batch_size: int = 32) -> "Pipeline":
        """Load a checkpoint (default: the shipped one) with its encoders and the stage cache."""
        path = Path(checkpoint) if checkpoint else default_checkpoint()
        from .features import resolve_device

        dev = resolve_device(device)
        module = load_module(path, map_location=dev)
        hp = module.hparams
        names = {s: hp[f"{s}_encoder"] for s in module.stream_names}
        modules, salt = None, ""
        if hp.get("mode") == "finetune":
            # Fine-tuned encoders live in the checkpoint; their features must not mix with pretrained ones.
            from .model.lit import encoder_key

            modules = {names[s]: module.encoders[encoder_key(names[s])] for s in module.stream_names}
            salt = _dir_digest(path)
        preset = (getattr(module, "checkpoint_meta", {}).get("thresholds") or {}).get("balanced")
        if preset is not None:  # the checkpoint's own balanced threshold, unless the caller says otherwise
            thresholds = {module.schema.primary: preset, **(thresholds or {})}
        extractor = FeatureExtractor(names, StageCache(cache), device=str(dev), progress=progress, modules=modules,
                                     salt=salt, batch_size=batch_size,
                                     max_tokens={s: hp.get("max_tokens", 128) for s in ("caption", "reasoning")})
        return cls(module, extractor, ocr=ocr, explainer=explainer, thresholds=thresholds, checkpoint=str(path))

    # ------------------------------------------------------------ batch inference
    @torch.inference_mode()
    def predict_features(self, feats: Sequence[dict[str, StreamFeature | None]], batch_size: int = 256) -> dict[str, np.ndarray]:
        """Class probabilities per task for precomputed stream features."""
        collate = feature_collate(self.schema, {s: self.module.hparams["input_dims"][s] for s in self.streams},
                                  self.module.hparams.get("inputs") == "tokens")
        out: dict[str, list[np.ndarray]] = {t.name: [] for t in self.schema.tasks}
        dev = self.module.device
        for b in range(0, len(feats), batch_size):
            items = [{"meme": Meme(id=str(i), image=None), "features": f} for i, f in enumerate(feats[b:b + batch_size])]
            batch = collate(items)
            batch["streams"] = {s: {k: v.to(dev) for k, v in d.items()} for s, d in batch["streams"].items()}
            for task, logits in self.module(batch).items():
                out[task].append(logits.float().softmax(-1).cpu().numpy())
        return {t: np.concatenate(v) if v else np.zeros((0, self.schema.task(t).num_classes)) for t, v in out.items()}

    def predict_memes(self, memes: Sequence[Meme]) -> Predictions:
        """Probabilities for memes as read from a manifest or folder (features through the cache)."""
        feats, errors = self.extractor.extract(memes, self.streams)
        kept = [i for i in range(len(memes)) if i not in errors]
        probs = self.predict_features([feats[i] for i in kept])
        return Predictions(probs, kept, errors)

    # ------------------------------------------------------------ decisions
    def describe(self, probs: dict[str, np.ndarray], thresholds: dict[str, float] | None = None) -> dict:
        """Labels, probabilities and the decision for one meme (see :func:`dhumor.decision.describe`)."""
        return describe(self.schema, probs, {**self.thresholds, **(thresholds or {})})

    def score_file(self, path: str | Path, caption: str | None = None, explanation: str | None = None,
                   force_explain: bool = False) -> dict:
        """Score one image file end to end (OCR and explanation when configured). Raises DataError on a bad file.
        ``force_explain`` runs the explainer even when the checkpoint has no reasoning stream (for review)."""
        from .images import load_image_with_digest

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        img, digest = load_image_with_digest(path)
        timings["decode"] = time.perf_counter() - t0
        return self.score_image(img, digest, caption=caption, explanation=explanation, timings=timings, name=str(path),
                                force_explain=force_explain)

    def score_image(self, img, digest: str, caption: str | None = None, explanation: str | None = None,
                    timings: dict | None = None, name: str = "<image>", thresholds: dict | None = None,
                    force_explain: bool = False) -> dict:
        """Score a decoded image whose file digest is known."""
        timings = dict(timings or {})
        t = time.perf_counter()
        if caption is None and self.ocr is not None:
            caption = self.ocr.read(img, digest)
            timings["ocr"] = time.perf_counter() - t
        trail = None
        if explanation is None and self.explainer is not None and ("reasoning" in self.streams or force_explain):
            t = time.perf_counter()
            res = self.explainer.explain(img, digest, caption or "")
            timings["explain"] = time.perf_counter() - t
            trail = res.to_dict() if res is not None else None
            explanation = res.text if res is not None and res.ok else None
        t = time.perf_counter()
        feats: dict[str, StreamFeature | None] = {}
        if "image" in self.streams:
            feats["image"] = self.extractor.image_features_from_pil([img], [digest])[0]
        if "caption" in self.streams:
            feats["caption"] = self.extractor.text_features("caption", [caption])[0]
        if "reasoning" in self.streams:
            feats["reasoning"] = self.extractor.text_features("reasoning", [explanation])[0]
        timings["features"] = time.perf_counter() - t
        t = time.perf_counter()
        probs = self.predict_features([feats])
        timings["model"] = time.perf_counter() - t
        out = self.describe({k: v[0] for k, v in probs.items()}, thresholds)
        out.update(sha256=digest, caption=caption, explanation=explanation, explanation_trail=trail,
                   timings={k: round(v, 4) for k, v in timings.items()})
        return out


def _dir_digest(path: Path) -> str:
    f = path / "model.safetensors" if path.is_dir() else path
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]
