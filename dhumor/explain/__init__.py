"""Explanations: a model explains the meme, then critiques its explanation as the meme's author.

>>> from dhumor.explain import create_explainer
>>> ex = create_explainer("offline", iterations=3)            # doctest: +SKIP
>>> ex.explain(img, sha256, "WHEN THE VET SAYS...").final     # doctest: +SKIP

Importing this package is light (no torch): the backends' registry (:mod:`dhumor.explain.backends`)
is read by the CLI and preflight before any model loads; the rest loads on first use.
"""
from __future__ import annotations

from dhumor.explain.backends import BACKENDS

__all__ = ["BACKENDS", "Explainer", "Explanation", "LoopResult", "ParseError", "RoleReversalLoop",
           "create_backend", "create_explainer", "parse_critique", "parse_explanation"]

_LAZY = {"Explainer": "explainer", "LoopResult": "loop", "RoleReversalLoop": "loop", "Explanation": "schema",
         "ParseError": "schema", "parse_critique": "schema", "parse_explanation": "schema"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"dhumor.explain.{_LAZY[name]}"), name)
    raise AttributeError(name)


def create_backend(name: str, **settings):
    """A backend by registered name (:data:`BACKENDS`): ``offline`` (SmolLM2 on this machine;
    ``sequences`` answers decoded together), ``openai`` (any compatible server; ``timeout`` bounds
    each request, retries included), ``transformers`` (a local VLM, ``model`` = hub id or directory).
    Settings a backend does not take are ignored."""
    BACKENDS.get(name)  # an unknown name: ConfigError listing the choices
    if name == "transformers" and not settings.get("model"):
        from dhumor.errors import ConfigError

        raise ConfigError("the transformers backend needs --explain-model (a hub id or a local directory of a VLM)")
    return BACKENDS.create(name, **settings)


def create_explainer(name: str, cache=None, iterations: int | None = None, similarity_threshold: float = 0.9,
                     progress: bool = False, batch_size: int = 8, prompt_version: str | None = None,
                     max_tokens: int = 400, **backend_kwargs):
    """An :class:`Explainer` over the named backend (see :func:`create_backend`)."""
    from dhumor.explain.explainer import Explainer
    from dhumor.explain.prompts import DEFAULT_VERSION, Prompts

    backend_kwargs.setdefault("sequences", batch_size)  # offline: decode as many answers as memes in flight
    backend = create_backend(name, **backend_kwargs)
    return Explainer(backend, cache=cache, iterations=3 if iterations is None else iterations,
                     similarity_threshold=similarity_threshold, progress=progress, batch_size=batch_size,
                     prompts=Prompts.load(prompt_version or DEFAULT_VERSION), max_tokens=max_tokens)
