"""One long-lived thread for every model call a server makes.

Why it matters: PyTorch (the encoders, the visual cues) and llama.cpp (the offline explainer) share
one OpenMP runtime, libgomp, in the process. libgomp gives each thread that starts parallel work its
own team of worker threads; once the teams outnumber the cores it stops spin-waiting at barriers and
sleeps instead. llama.cpp meets a barrier at every operation of every token, so in the demo, where
Gradio ran each step of a request on whichever of its worker threads was free, the offline explainer
decoded at about 30 tokens/s instead of 50 on 2 cores. With every model call on one thread, PyTorch
and llama.cpp reuse a single team (``bench/demo_latency.py`` measures the difference).
"""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class ModelThread:
    """Runs callables, and the steps of generators, on one dedicated thread, in submission order."""

    def __init__(self, name: str = "dhumor-models"):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._ident: int | None = None

    def _on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run on the model thread; its result, or its exception re-raised here."""
        if self._on_thread():  # already there (a model call nested in another): waiting on ourselves would deadlock
            return fn(*args, **kwargs)

        def run():
            self._ident = threading.get_ident()
            return fn(*args, **kwargs)

        return self._pool.submit(run).result()

    def iterate(self, gen: Iterator[T]) -> Iterator[T]:
        """``gen``'s items, each one computed on the model thread; closing this generator (a client
        that went away) closes ``gen`` there too."""
        try:
            while True:
                item = self.call(next, gen, _END)
                if item is _END:
                    return
                yield item
        finally:
            close = getattr(gen, "close", None)
            if close is not None:
                self.call(close)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
