"""Frozen encoders per stream: loaded on first use, shared between streams that name the same
encoder, and run in inference mode. Turning a batch of pixels or texts into features is all they do;
the stage cache and batching live in :mod:`dhumor.encoders.features`."""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass

import numpy as np
import torch

from dhumor.cache import StageCache
from dhumor.encoders.modules import build_encoder
from dhumor.encoders.registry import EncoderEntry, get_entry


@dataclass
class StreamFeature:
    """One stream of one meme: per-token vectors (padding removed) and the pooled vector, float16."""

    tokens: np.ndarray  # (N, D)
    pooled: np.ndarray  # (D,)

    def pack(self) -> bytes:
        return StageCache.pack_arrays(tokens=self.tokens, pooled=self.pooled)

    @classmethod
    def unpack(cls, data: bytes) -> "StreamFeature":
        a = StageCache.unpack_arrays(data)
        return cls(a["tokens"], a["pooled"])


@contextlib.contextmanager
def _rng_untouched():
    """Leave the global random generators (Python, NumPy, torch) as they were.

    Building an encoder draws its random initialisation before the pretrained weights replace it.
    Features are built only on a cold cache, so without this the same ``fit --seed_everything S``
    trained on a different random stream (shuffles, dropout) cold than warm: a different model."""
    py, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class FrozenEncoders:
    """``names`` maps a stream (``image``, ``caption``, ``reasoning``) to an encoder name; ``modules``
    supplies ready modules by encoder name (fine-tuned ones from a checkpoint)."""

    def __init__(self, names: dict[str, str], device: str | torch.device | None = "auto",
                 modules: dict[str, torch.nn.Module] | None = None):
        self.names = dict(names)
        self.device = resolve_device(device) if not isinstance(device, torch.device) else device
        self._modules: dict[str, torch.nn.Module] = dict(modules or {})

    def module(self, stream: str) -> torch.nn.Module:
        name = self.names[stream]
        if name not in self._modules:
            with _rng_untouched():  # building initialises weights before loading them: see _rng_untouched
                m = build_encoder(get_entry(name), pretrained=True).to(self.device).eval()
            for p in m.parameters():
                p.requires_grad_(False)
            self._modules[name] = m
        return self._modules[name]

    def entry(self, stream: str) -> EncoderEntry:
        e = get_entry(self.names[stream])
        return e if e.dim is not None else self.module(stream).entry

    def dims(self, streams) -> dict[str, int]:
        return {s: self.entry(s).dim for s in streams}

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> list[StreamFeature]:
        o = self.module("image")(pixels.to(self.device))
        tokens = o.tokens.float().cpu().numpy().astype(np.float16)
        pooled = o.pooled.float().cpu().numpy().astype(np.float16)
        return [StreamFeature(t, p) for t, p in zip(tokens, pooled)]

    @torch.inference_mode()
    def encode_texts(self, stream: str, texts: list[str], max_tokens: int) -> list[StreamFeature]:
        enc = self.module(stream)
        tok = enc.tokenize(texts, max_tokens=max_tokens)
        o = enc(tok["input_ids"].to(self.device), tok["attention_mask"].to(self.device))
        lengths = tok["attention_mask"].sum(1).tolist()
        tokens = o.tokens.float().cpu().numpy().astype(np.float16)
        pooled = o.pooled.float().cpu().numpy().astype(np.float16)
        return [StreamFeature(t[:n], p) for t, n, p in zip(tokens, lengths, pooled)]
