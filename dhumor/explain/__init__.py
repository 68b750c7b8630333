"""Explanations: a model explains the meme, then critiques its explanation as the meme's author.

>>> from dhumor.explain import create_explainer
>>> ex = create_explainer("offline", iterations=3)            # doctest: +SKIP
>>> ex.explain(img, sha256, "WHEN THE VET SAYS...").final     # doctest: +SKIP
"""
from __future__ import annotations

from ..cache import StageCache
from ..errors import InvalidValueError
from .explainer import Explainer
from .loop import LoopResult, RoleReversalLoop
from .schema import Explanation, ParseError, parse_critique, parse_explanation

BACKENDS = ("offline", "openai", "transformers")

__all__ = ["BACKENDS", "Explainer", "Explanation", "LoopResult", "ParseError", "RoleReversalLoop",
           "create_backend", "create_explainer", "parse_critique", "parse_explanation"]


def create_backend(name: str, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                   concurrency: int = 4, send_images: bool = True, batch_size: int = 4,
                   threads: int | None = None, timeout: float | None = None, sequences: int = 8):
    """A backend by name: ``offline`` (SmolLM2, this machine; ``sequences`` answers decoded together),
    ``openai`` (any compatible server; ``timeout`` bounds each request, retries included),
    ``transformers`` (a local VLM, ``model`` = hub id or directory)."""
    if name == "offline":
        from .backends.offline import offline_backend

        return offline_backend(model, n_threads=threads, sequences=sequences)
    if name == "openai":
        from .backends.openai_compat import OpenAIBackend

        return OpenAIBackend(model=model, base_url=base_url, api_key=api_key, concurrency=concurrency,
                             send_images=send_images, timeout=timeout)
    if name == "transformers":
        if not model:
            raise InvalidValueError("the transformers backend needs --explain-model (a hub id or a local directory of a VLM)")
        from .backends.transformers_vlm import TransformersVLMBackend

        return TransformersVLMBackend(model, batch_size=batch_size)
    raise InvalidValueError(f"unknown explanation backend {name!r}; choose one of {BACKENDS}")


def create_explainer(name: str, cache: StageCache | None = None, iterations: int | None = None,
                     similarity_threshold: float = 0.9, progress: bool = False, batch_size: int = 8,
                     prompt_version: str | None = None, max_tokens: int = 400, **backend_kwargs) -> Explainer:
    """An :class:`Explainer` over the named backend (see :func:`create_backend`)."""
    from .prompts import DEFAULT_VERSION, Prompts

    backend_kwargs.setdefault("sequences", batch_size)  # offline: decode as many answers as memes in flight
    backend = create_backend(name, **backend_kwargs)
    return Explainer(backend, cache=cache, iterations=3 if iterations is None else iterations, similarity_threshold=similarity_threshold,
                     progress=progress, batch_size=batch_size, prompts=Prompts.load(prompt_version or DEFAULT_VERSION),
                     max_tokens=max_tokens)
