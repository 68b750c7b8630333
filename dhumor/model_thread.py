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

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, TypeVar

T = TypeVar("T")
_END = object()


class ModelThread:
    """Runs callables, and the steps of generators, on one dedicated thread, in submission order.

    A daemon thread, not an executor: the interpreter joins an executor's workers at exit, so
    Ctrl-C or SIGTERM would wait for the explanation step in progress."""

    def __init__(self, name: str = "dhumor-models"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args, kwargs = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kwargs))
            except BaseException as e:  # handed to the caller, who re-raises it
                fut.set_exception(e)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run on the model thread; its result, or its exception re-raised here."""
        if threading.current_thread() is self._thread:  # a nested call: waiting on ourselves would deadlock
            return fn(*args, **kwargs)
        if not self._thread.is_alive():
            raise RuntimeError("the model thread has been shut down")
        fut: Future = Future()
        self._jobs.put((fut, fn, args, kwargs))
        return fut.result()

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
            if close is not None and self._thread.is_alive():
                self.call(close)

    def shutdown(self) -> None:
        """Stop after the jobs already queued."""
        self._jobs.put(None)
