"""Frozen-encoder features for memes, computed once per (content, encoder settings) and kept in the stage cache.

The work is split by job: :class:`~dhumor.encoders.frozen.FrozenEncoders` loads and runs the
encoders, :class:`FeatureKeys` names each result in the cache, :func:`~dhumor.images.decode_many`
reads and decodes image files on threads, and :class:`FeatureExtractor` looks results up, batches
what is missing through the encoders, stores it and shows progress.

>>> fx = FeatureExtractor({"image": "efficientnet-lite0", "caption": "all-mpnet-base-v2"})  # doctest: +SKIP
>>> feats, errors = fx.extract(memes, ["image", "caption"])                                  # doctest: +SKIP
>>> feats[0]["caption"].pooled.shape                                                          # doctest: +SKIP
(768,)
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from dhumor.cache import StageCache
from dhumor.encoders.transforms import eval_transform
from dhumor.encoders.frozen import FrozenEncoders, StreamFeature, resolve_device  # noqa: F401  (public names)
from dhumor.encoders.registry import EncoderEntry
from dhumor.errors import DataError
from dhumor.images import decode_many, read_image_bytes, sha256_bytes
from dhumor.schema import Meme

STAGE = "features"


# The version of what turns an input into features: image preprocessing, the encoders' forward and
# pooling. Part of every feature key. Bump it on purpose when a change alters the numbers;
# tests/test_features_golden.py fails when they change without a bump (a refactor or a docstring
# does not recompute anyone's features).
FEATURE_VERSION = 1


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class ExtractStats:
    computed: int = 0
    cached: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


class FeatureKeys:
    """Cache keys of features: the input's digest + everything that decides the output (the encoder's
    registry entry, its token limit, :data:`FEATURE_VERSION`, and a fine-tuned checkpoint's salt)."""

    def __init__(self, encoders: FrozenEncoders, max_tokens: dict[str, int] | None = None, salt: str = ""):
        self.encoders, self.max_tokens, self.salt = encoders, dict(max_tokens or {}), salt

    def settings(self, stream: str) -> dict:
        e: EncoderEntry = self.encoders.entry(stream)
        s = {"version": FEATURE_VERSION, "encoder": e.fingerprint()}
        if self.salt:
            s["salt"] = self.salt
        if e.modality == "text":
            s["max_tokens"] = self.max_tokens.get(stream, e.max_tokens)
        return s

    def keys(self, stream: str, digests: Sequence[str | None]) -> list[str | None]:
        settings = self.settings(stream)
        return [StageCache.key(d, settings) if d else None for d in digests]


class FeatureExtractor:
    """Maps memes to per-stream features with frozen encoders; every result goes through the cache.

    ``encoders`` maps a stream (``image``, ``caption``, ``reasoning``) to an encoder name. Streams that
    share an encoder share one module. ``modules`` supplies encoder modules by name (fine-tuned ones
    from a checkpoint); then ``salt`` (the checkpoint's digest) keeps their features apart in the cache.
    """

    def __init__(self, encoders: dict[str, str], cache: StageCache | None = None, device: str | None = "auto",
                 batch_size: int = 32, workers: int = 2, progress: bool = True, max_tokens: dict[str, int] | None = None,
                 modules: dict[str, torch.nn.Module] | None = None, salt: str = ""):
        self.encoders = FrozenEncoders(encoders, device, modules)
        self.keys = FeatureKeys(self.encoders, max_tokens, salt)
        self.names, self.device, self.cache = self.encoders.names, self.encoders.device, cache
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.stats = ExtractStats()

    # Encoder access, for callers that warm up or size a model.
    def module(self, stream: str) -> torch.nn.Module:
        return self.encoders.module(stream)

    def entry(self, stream: str) -> EncoderEntry:
        return self.encoders.entry(stream)

    def dims(self, streams: Iterable[str]) -> dict[str, int]:
        return self.encoders.dims(streams)

    # ------------------------------------------------------------ cache
    def _lookup(self, keys: Sequence[str | None]) -> tuple[list, list[int]]:
        """Cached features in place, ``None`` elsewhere; and the positions still to compute."""
        hits = self.cache.get_many(STAGE, [k for k in keys if k]) if self.cache else {}
        out = [StreamFeature.unpack(hits[k]) if k in hits else None for k in keys]
        todo = [i for i, (k, o) in enumerate(zip(keys, out)) if k and o is None]
        self.stats.cached += sum(1 for k in keys if k) - len(todo)
        return out, todo

    def _store(self, keys: Sequence[str], feats: Sequence[StreamFeature]) -> None:
        if self.cache:
            self.cache.put_many(STAGE, [(k, f.pack()) for k, f in zip(keys, feats)])
        self.stats.computed += len(feats)

    # ------------------------------------------------------------ images
    def image_features(self, paths: Sequence[str | Path], desc: str = "image features") -> list[StreamFeature | DataError]:
        """Features for image files (errors in place of unusable files); cached by file content."""
        out: list[StreamFeature | DataError] = [None] * len(paths)  # type: ignore[list-item]
        chunk = max(self.batch_size * 8, 64)  # bounds the bytes held in memory at once
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not self.progress)
        for start in range(0, len(paths), chunk):
            blobs: dict[int, bytes] = {}
            for i in range(start, min(start + chunk, len(paths))):
                try:
                    blobs[i] = read_image_bytes(paths[i])
                except DataError as e:
                    out[i] = e
            for i, r in zip(blobs, self.image_features_from_bytes([(blobs[i], str(paths[i])) for i in blobs])):
                out[i] = r
            bar.update(min(chunk, len(paths) - start))
        bar.close()
        return out

    def image_features_from_bytes(self, items: Sequence[tuple[bytes, str]]) -> list[StreamFeature | DataError]:
        """Features for (image bytes, name) pairs; only cache misses are decoded. The name is for errors."""
        keys = self.keys.keys("image", [sha256_bytes(b) for b, _ in items])
        out, todo = self._lookup(keys)
        prepped = decode_many([items[i] for i in todo], self.workers, eval_transform(self.entry("image")))
        ok = []
        for i, x in zip(todo, prepped):
            if isinstance(x, DataError):
                out[i] = x
                self.stats.failed += 1
            else:
                ok.append((i, x))
        self._encode_images(keys, out, ok)
        return out

    def image_features_from_pil(self, images: Sequence[Image.Image], digests: Sequence[str]) -> list[StreamFeature]:
        """Features for already-decoded images whose file digests are known (the pipeline)."""
        keys = self.keys.keys("image", digests)
        out, todo = self._lookup(keys)
        tf = eval_transform(self.entry("image"))
        self._encode_images(keys, out, [(i, tf(images[i])) for i in todo])
        return out

    def _encode_images(self, keys: Sequence[str], out: list, pixels: list[tuple[int, torch.Tensor]]) -> None:
        for b in range(0, len(pixels), self.batch_size):
            batch = pixels[b:b + self.batch_size]
            feats = self.encoders.encode_images(torch.stack([x for _, x in batch]))
            for (i, _), f in zip(batch, feats):
                out[i] = f
            self._store([keys[i] for i, _ in batch], feats)

    # ------------------------------------------------------------ text
    def text_features(self, stream: str, texts: Sequence[str | None], desc: str | None = None) -> list[StreamFeature | None]:
        """Features for texts of a text stream; ``None`` for a missing or empty text (the stream is absent)."""
        norm = [t.strip() if isinstance(t, str) and t.strip() else None for t in texts]
        keys = self.keys.keys(stream, [text_digest(t) if t else None for t in norm])
        out, todo = self._lookup(keys)
        # Longest first, so that batches pad little and the first batch shows the worst memory use.
        todo.sort(key=lambda i: -len(norm[i]))
        max_tokens = self.keys.settings(stream)["max_tokens"] if todo else 0
        bar = tqdm(total=len(todo), desc=desc or f"{stream} features", unit="text", disable=not self.progress or not todo)
        for b in range(0, len(todo), self.batch_size):  # all cached: no model is loaded at all
            batch = todo[b:b + self.batch_size]
            feats = self.encoders.encode_texts(stream, [norm[i] for i in batch], max_tokens)
            self._store([keys[i] for i in batch], feats)
            for i, f in zip(batch, feats):
                out[i] = f
            bar.update(len(batch))
        bar.close()
        return out

    # ------------------------------------------------------------ memes
    def extract(self, memes: Sequence[Meme], streams: Iterable[str]) -> tuple[list[dict[str, StreamFeature | None]], dict[int, DataError]]:
        """Per-meme features of the asked streams, and the memes whose image could not be used."""
        streams = list(streams)
        feats: list[dict] = [{} for _ in memes]
        errors: dict[int, DataError] = {}
        if "image" in streams:
            for i, r in enumerate(self.image_features([m.image for m in memes])):
                if isinstance(r, DataError):
                    errors[i] = r
                else:
                    feats[i]["image"] = r
        for stream, attr in (("caption", "caption"), ("reasoning", "explanation")):
            if stream in streams:
                for i, r in enumerate(self.text_features(stream, [getattr(m, attr) for m in memes])):
                    feats[i][stream] = r
        return feats, errors
