"""Explanations through the stage cache: one :class:`Explainer` serves ``dhumor explain``, scoring,
evaluation and the demo.

The cache key of a meme's explanation is its image digest and caption, with the loop's settings
(backend and model, prompt version and digest, iterations, threshold, decoding) as fingerprint.
Backend failures (a server that was down) are not cached, so a rerun retries them; answers the
model could not get right are cached as failures with their raw text.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dhumor.cache import StageCache
from dhumor.errors import DataError
from dhumor.schema import Meme
from dhumor.explain.backends.base import Backend
from dhumor.explain.loop import LoopInput, LoopResult, RoleReversalLoop

log = logging.getLogger("dhumor")
STAGE, CUES_STAGE = "explain", "visual_cues"


class VisualCues:
    """Top ImageNet labels from EfficientNet-Lite: what a text-only model is told the image shows."""

    def __init__(self, encoder: str = "efficientnet-lite0", top_k: int = 5, cache: StageCache | None = None):
        self.encoder_name, self.top_k, self.cache = encoder, top_k, cache
        self._model = None

    @property
    def settings(self) -> dict:
        return {"v": 1, "encoder": self.encoder_name, "top_k": self.top_k}

    def __call__(self, images: Sequence[Image.Image], digests: Sequence[str]) -> list[list[str]]:
        keys = [StageCache.key(d, self.settings) for d in digests]
        hits = self.cache.get_many(CUES_STAGE, keys) if self.cache else {}
        out: list = [StageCache.unpack_json(hits[k]) if k in hits else None for k in keys]
        todo = [i for i, o in enumerate(out) if o is None]
        if todo:
            from torchvision.models import ResNet50_Weights  # the ImageNet-1k class names (no weights loaded)

            from dhumor.encoders.transforms import eval_transform
            from dhumor.encoders.modules import build_encoder
            from dhumor.encoders.registry import get_entry

            entry = get_entry(self.encoder_name)
            if self._model is None:
                self._model = build_encoder(entry).eval()
            names = ResNet50_Weights.IMAGENET1K_V1.meta["categories"]
            tf = eval_transform(entry)
            with torch.inference_mode():
                logits = self._model.classify(torch.stack([tf(images[i]) for i in todo]))
            top = logits.softmax(-1).topk(self.top_k, -1).indices.tolist()
            for i, idx in zip(todo, top):
                out[i] = [names[j] for j in idx]
            if self.cache:
                self.cache.put_many(CUES_STAGE, [(keys[i], StageCache.pack_json(out[i])) for i in todo])
        return out


class Explainer:
    def __init__(self, backend: Backend, cache: StageCache | None = None, iterations: int = 3,
                 similarity_threshold: float = 0.9, batch_size: int = 8, progress: bool = False, **loop_kwargs):
        self.backend = backend
        self.loop = RoleReversalLoop(backend, iterations=iterations, similarity_threshold=similarity_threshold,
                                     **loop_kwargs)
        self.cache, self.batch_size, self.progress = cache, max(1, batch_size), progress
        self.cues = VisualCues(cache=cache) if not backend.supports_images else None
        self.stats = {"computed": 0, "cached": 0, "failed": 0}

    @property
    def settings(self) -> dict:
        s = self.loop.settings()
        if self.cues is not None:
            s["cues"] = self.cues.settings
        return s

    def key(self, digest: str, caption: str) -> str:
        content = hashlib.sha256(f"{digest}\0{caption or ''}".encode()).hexdigest()
        return StageCache.key(content, self.settings)

    def cached(self, digest: str, caption: str) -> LoopResult | None:
        if not self.cache:
            return None
        hit = self.cache.get(STAGE, self.key(digest, caption))
        return LoopResult.from_dict(StageCache.unpack_json(hit)) if hit is not None else None

    def _store(self, digest: str, caption: str, r: LoopResult) -> None:
        self.stats["computed"] += 1
        self.stats["failed"] += not r.ok
        if self.cache and not r.backend_failed:  # a server that was down: a rerun retries it
            self.cache.put(STAGE, self.key(digest, caption), StageCache.pack_json(r.to_dict()))

    def explain_stream(self, memes: Iterable[tuple[Any, Image.Image, str, str]]) -> Iterator[tuple[Any, LoopResult]]:
        """``(tag, result)`` for each ``(tag, image, digest, caption)``, in the order memes finish.

        Memes are read from ``memes`` only as slots free up (up to ``batch_size`` in flight, each at
        whatever iteration it is: see :meth:`RoleReversalLoop.run_iter`), so a long run holds few
        images; cached memes come back at once."""
        pending: dict[int, tuple[Any, str, str]] = {}  # the loop's input index -> the meme
        counter = itertools.count()

        def fresh() -> Iterator[tuple[Image.Image, str, str]]:
            for tag, img, digest, caption in memes:
                hit = self.cached(digest, caption)
                if hit is not None:
                    self.stats["cached"] += 1
                    ready.append((tag, hit))
                    continue
                pending[next(counter)] = (tag, digest, caption)
                yield img, digest, caption

        ready: list[tuple[Any, LoopResult]] = []
        bar = tqdm(desc="explaining", unit="meme", disable=not self.progress)
        for n, res, done in self.loop.run_iter(self._inputs(fresh()), slots=self.batch_size):
            yield from _drain(ready)
            if done:
                tag, digest, caption = pending.pop(n)
                self._store(digest, caption, res)
                bar.update(1)
                yield tag, res
        yield from _drain(ready)
        bar.close()

    def explain_many(self, images: Sequence[Image.Image], digests: Sequence[str], captions: Sequence[str],
                     desc: str = "explaining") -> list[LoopResult]:
        """Loop results for many memes, in input order; cached ones are not recomputed."""
        out: list[LoopResult | None] = [None] * len(images)
        for i, res in self.explain_stream(zip(range(len(images)), images, digests, captions)):
            out[i] = res
        return out  # type: ignore[return-value]

    def _inputs(self, memes: Iterable[tuple[Image.Image, str, str]]) -> Iterator[LoopInput]:
        """Loop inputs, with visual cues computed a batch at a time as the loop asks for more."""
        it = iter(memes)
        while True:
            chunk = list(itertools.islice(it, self.batch_size))
            if not chunk:
                return
            cues = self.cues([m[0] for m in chunk], [m[1] for m in chunk]) if self.cues else [None] * len(chunk)
            yield from (LoopInput(img, caption or "", c) for (img, _, caption), c in zip(chunk, cues))

    def explain(self, image: Image.Image, digest: str, caption: str) -> LoopResult:
        return self.explain_many([image], [digest], [caption])[0]

    def explain_iter(self, image: Image.Image, digest: str, caption: str) -> Iterator[LoopResult]:
        """The meme's result after each finished iteration, for a page that shows explanations as
        they come: the same (growing) :class:`LoopResult` object is yielded every time; the last
        one is final (``stop_reason`` set) and cached. A cached meme yields once.

        >>> for r in explainer.explain_iter(img, sha256, caption):   # doctest: +SKIP
        ...     show(r.iterations[-1], final=bool(r.stop_reason))
        """
        hit = self.cached(digest, caption)
        if hit is not None:
            self.stats["cached"] += 1
            yield hit
            return
        cues = self.cues([image], [digest])[0] if self.cues else None
        for _, res, done in self.loop.run_iter([LoopInput(image, caption or "", cues)], slots=1):
            if done:
                self._store(digest, caption, res)
            yield res

    def attach(self, memes: Sequence[Meme]) -> None:
        """Set ``meme.explanation`` for memes (images read from disk; unreadable ones stay without)."""
        from dhumor.images import load_image_with_digest

        loaded = []
        for m in memes:
            try:
                img, d = load_image_with_digest(m.image)
                loaded.append((m, img, d))
            except DataError as e:
                log.warning("no explanation for %s: %s", m.id, e)
        res = self.explain_many([x[1] for x in loaded], [x[2] for x in loaded], [x[0].caption or "" for x in loaded])
        for (m, _, _), r in zip(loaded, res):
            m.explanation = r.text if r.ok else None


def _drain(items: list) -> Iterator:
    while items:
        yield items.pop(0)
