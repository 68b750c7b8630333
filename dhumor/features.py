"""Frozen-encoder features for memes, computed once per (content, encoder) and kept in the stage cache.

>>> fx = FeatureExtractor({"image": "efficientnet-lite0", "caption": "all-mpnet-base-v2"})  # doctest: +SKIP
>>> feats, errors = fx.extract(memes, ["image", "caption"])                                  # doctest: +SKIP
>>> feats[0]["caption"].pooled.shape                                                          # doctest: +SKIP
(768,)
"""
from __future__ import annotations

import functools
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .cache import StageCache
from .data.transforms import eval_transform
from .encoders.modules import build_encoder
from .encoders.registry import EncoderEntry, get_entry
from .errors import DataError
from .images import decode_image, read_image_bytes, sha256_bytes
from .schema import Meme

STAGE = "features"


@functools.lru_cache(maxsize=None)
def code_digest() -> str:
    """A digest of the code that turns an input into features (image preprocessing, the encoders'
    forward and pooling), part of every feature key: editing that code recomputes features instead
    of serving stale ones, with no version number to remember to bump."""
    import inspect

    from .data import transforms
    from .encoders import modules

    src = inspect.getsource(transforms) + inspect.getsource(modules)
    return hashlib.sha256(src.encode()).hexdigest()[:16]


@dataclass
class StreamFeature:
    tokens: np.ndarray  # (N, D) float16, padding removed
    pooled: np.ndarray  # (D,) float16

    def pack(self) -> bytes:
        return StageCache.pack_arrays(tokens=self.tokens, pooled=self.pooled)

    @classmethod
    def unpack(cls, data: bytes) -> "StreamFeature":
        a = StageCache.unpack_arrays(data)
        return cls(a["tokens"], a["pooled"])


@dataclass
class ExtractStats:
    computed: int = 0
    cached: int = 0
    failed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FeatureExtractor:
    """Maps memes to per-stream features with frozen encoders; every result goes through the cache.

    ``encoders`` maps a stream (``image``, ``caption``, ``reasoning``) to an encoder name. Streams that
    share an encoder share one module.
    """

    def __init__(self, encoders: dict[str, str], cache: StageCache | None = None, device: str | None = "auto",
                 batch_size: int = 32, workers: int = 2, progress: bool = True, max_tokens: dict[str, int] | None = None,
                 modules: dict[str, torch.nn.Module] | None = None, salt: str = ""):
        """``modules`` supplies encoder modules by name (fine-tuned ones from a checkpoint); then ``salt``
        (the checkpoint's digest) keeps their features apart from the pretrained encoders' in the cache."""
        self.names = dict(encoders)
        self.salt = salt
        self.cache = cache
        self.device = resolve_device(device)
        self.batch_size, self.workers, self.progress = batch_size, workers, progress
        self.max_tokens = dict(max_tokens or {})
        self._modules: dict[str, torch.nn.Module] = dict(modules or {})
        self.stats = ExtractStats()

    # ------------------------------------------------------------ encoders
    def module(self, stream: str) -> torch.nn.Module:
        name = self.names[stream]
        if name not in self._modules:
            m = build_encoder(get_entry(name), pretrained=True).to(self.device).eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self._modules[name] = m
        return self._modules[name]

    def entry(self, stream: str) -> EncoderEntry:
        e = get_entry(self.names[stream])
        return e if e.dim is not None else self.module(stream).entry

    def dims(self, streams: Iterable[str]) -> dict[str, int]:
        return {s: self.entry(s).dim for s in streams}

    def _settings(self, stream: str) -> dict:
        e = self.entry(stream)
        s = {"code": code_digest(), "encoder": e.fingerprint()}
        if self.salt:
            s["salt"] = self.salt
        if e.modality == "text":
            s["max_tokens"] = self.max_tokens.get(stream, e.max_tokens)
        return s

    # ------------------------------------------------------------ images
    def image_features(self, paths: Sequence[str | Path], desc: str = "image features") -> list[StreamFeature | DataError]:
        """Features for image files (errors in place of unusable files); cached by file content."""
        out: list[StreamFeature | DataError] = [None] * len(paths)  # type: ignore[list-item]
        chunk = max(self.batch_size * 8, 64)
        bar = tqdm(total=len(paths), desc=desc, unit="img", disable=not self.progress)
        for start in range(0, len(paths), chunk):
            idx = list(range(start, min(start + chunk, len(paths))))
            blobs: dict[int, bytes] = {}
            for i in idx:
                try:
                    blobs[i] = read_image_bytes(paths[i])
                except DataError as e:
                    out[i] = e
            res = self.image_features_from_bytes([(blobs[i], str(paths[i])) for i in blobs])
            for i, r in zip(blobs, res):
                out[i] = r
            bar.update(len(idx))
        bar.close()
        return out

    def image_features_from_bytes(self, items: Sequence[tuple[bytes, str]]) -> list[StreamFeature | DataError]:
        """Features for (image bytes, name) pairs; the name is only used in error messages."""
        keys = self._image_keys([sha256_bytes(b) for b, _ in items])
        out, todo = self._lookup(keys)
        tf = eval_transform(self.entry("image"))

        def prep(i):
            data, name = items[i]
            try:
                return tf(decode_image(data, name))
            except DataError as e:
                return e

        with ThreadPoolExecutor(max(1, self.workers)) as pool:
            prepped = list(pool.map(prep, todo))
        for i, x in zip(todo, prepped):
            if isinstance(x, DataError):
                out[i] = x
                self.stats.failed += 1
        self._encode_and_store(keys, out, [(i, x) for i, x in zip(todo, prepped) if not isinstance(x, DataError)])
        return out

    def image_features_from_pil(self, images: Sequence[Image.Image], digests: Sequence[str]) -> list[StreamFeature]:
        """Features for already-decoded images whose file digests are known (the demo, the scorer)."""
        keys = self._image_keys(digests)
        out, todo = self._lookup(keys)
        tf = eval_transform(self.entry("image"))
        self._encode_and_store(keys, out, [(i, tf(images[i])) for i in todo])
        return out

    def _image_keys(self, digests: Sequence[str]) -> list[str]:
        settings = self._settings("image")
        return [StageCache.key(d, settings) for d in digests]

    def _lookup(self, keys: Sequence[str]) -> tuple[list, list[int]]:
        """Cached features in place, ``None`` elsewhere; and the positions still to compute."""
        hits = self.cache.get_many(STAGE, keys) if self.cache else {}
        out = [StreamFeature.unpack(hits[k]) if k in hits else None for k in keys]
        todo = [i for i, o in enumerate(out) if o is None]
        self.stats.cached += len(keys) - len(todo)
        return out, todo

    def _encode_and_store(self, keys: Sequence[str], out: list, pixels: list[tuple[int, torch.Tensor]]) -> None:
        """Encode (position, pixels) pairs in batches, fill ``out`` and store the results in the cache."""
        fresh = []
        for b in range(0, len(pixels), self.batch_size):
            batch = pixels[b:b + self.batch_size]
            for (i, _), f in zip(batch, self._encode_images(torch.stack([x for _, x in batch]))):
                out[i] = f
                fresh.append((keys[i], f.pack()))
        if self.cache:
            self.cache.put_many(STAGE, fresh)
        self.stats.computed += len(pixels)

    @torch.inference_mode()
    def _encode_images(self, pixels: torch.Tensor) -> list[StreamFeature]:
        o = self.module("image")(pixels.to(self.device))
        tokens = o.tokens.float().cpu().numpy().astype(np.float16)
        pooled = o.pooled.float().cpu().numpy().astype(np.float16)
        return [StreamFeature(t, p) for t, p in zip(tokens, pooled)]

    # ------------------------------------------------------------ text
    def text_features(self, stream: str, texts: Sequence[str | None], desc: str | None = None) -> list[StreamFeature | None]:
        """Features for texts of a text stream; ``None`` for a missing or empty text (the stream is absent)."""
        settings = self._settings(stream)
        norm = [t.strip() if isinstance(t, str) and t.strip() else None for t in texts]
        keys = [StageCache.key(text_digest(t), settings) if t else None for t in norm]
        hits = self.cache.get_many(STAGE, [k for k in keys if k]) if self.cache else {}
        out: list[StreamFeature | None] = [None] * len(texts)
        todo = []
        for i, k in enumerate(keys):
            if k is None:
                continue
            if k in hits:
                out[i] = StreamFeature.unpack(hits[k])
                self.stats.cached += 1
            else:
                todo.append(i)
        # Longest first, so that batches pad little and the first batch shows the worst memory use.
        todo.sort(key=lambda i: -len(norm[i]))
        bar = tqdm(total=len(todo), desc=desc or f"{stream} features", unit="text",
                   disable=not self.progress or not todo)
        max_tokens = settings["max_tokens"]
        enc = self.module(stream) if todo else None  # all cached: no model is loaded at all
        for b in range(0, len(todo), self.batch_size):
            batch = todo[b:b + self.batch_size]
            feats = self._encode_texts(enc, [norm[i] for i in batch], max_tokens)
            if self.cache:
                self.cache.put_many(STAGE, [(keys[i], f.pack()) for i, f in zip(batch, feats)])
            for i, f in zip(batch, feats):
                out[i] = f
            bar.update(len(batch))
        bar.close()
        self.stats.computed += len(todo)
        return out

    @torch.inference_mode()
    def _encode_texts(self, enc, texts: list[str], max_tokens: int) -> list[StreamFeature]:
        tok = enc.tokenize(texts, max_tokens=max_tokens)
        o = enc(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        lengths = tok["attention_mask"].sum(1).tolist()
        tokens = o.tokens.float().cpu().numpy().astype(np.float16)
        pooled = o.pooled.float().cpu().numpy().astype(np.float16)
        return [StreamFeature(t[:n], p) for t, n, p in zip(tokens, lengths, pooled)]

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
