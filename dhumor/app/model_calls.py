"""A pipeline whose model stages run on the demo's model thread while its waits do not.

The demo runs every PyTorch call on one :class:`~dhumor.app.model_thread.ModelThread` (that module says
why). Running a whole request there, explanation included, made each request's wait for its
explanation hold the thread: a second user waited behind the first, and could not share the
llama.cpp batch with it. Here only the compute stages go to the model thread (decoding and OCR,
encoders and the fusion model, the visual-cue classifier, and backends that compute in-process
without a scheduler of their own); a backend that serves concurrent callers itself (the batched
llama.cpp scheduler, an HTTP server) is called from the request's own thread, so many requests'
explanations are in flight at once.
"""
from __future__ import annotations

import copy
import functools
from typing import Any

from dhumor.explain.backends.base import Backend
from dhumor.app.model_thread import ModelThread


class _OnThread:
    """Calls to ``target`` (a callable with attributes, such as the visual-cue classifier) made on ``models``."""

    def __init__(self, target: Any, models: ModelThread):
        self._target, self._models = target, models

    def __call__(self, *args, **kwargs):
        return self._models.call(self._target, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._target, name)


class _BackendOnThread(Backend):
    """A backend whose :meth:`generate` runs on the model thread (it computes in this process)."""

    def __init__(self, inner: Backend, models: ModelThread):
        self.inner, self.models = inner, models
        self.name, self.supports_images = inner.name, inner.supports_images

    def fingerprint(self) -> dict:
        return self.inner.fingerprint()

    def generate(self, requests):
        return self.models.call(self.inner.generate, requests)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def serves_concurrently(backend: Backend) -> bool:
    """Whether ``backend`` may be called from many threads at once without computing on them."""
    from dhumor.explain.backends.llama_batch import LlamaBatchBackend
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    return isinstance(backend, (LlamaBatchBackend, OpenAIBackend))


def pipeline_on(models: ModelThread, pipe):
    """A shallow copy of ``pipe`` (same models, same cache) whose compute stages run on ``models``."""
    out = copy.copy(pipe)
    out.preprocess = functools.partial(models.call, pipe.preprocess)
    out.forward = functools.partial(models.call, pipe.forward)
    if pipe.explainer is not None:
        ex = out.explainer = copy.copy(pipe.explainer)
        if ex.cues is not None:
            ex.cues = _OnThread(pipe.explainer.cues, models)
        if not serves_concurrently(ex.backend):
            ex.backend = _BackendOnThread(ex.backend, models)
            ex.loop = copy.copy(pipe.explainer.loop)
            ex.loop.backend = ex.backend
    return out
