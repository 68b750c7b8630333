"""One long-lived thread for every model call a server makes.

Why it matters: PyTorch (the encoders, the visual cues) and llama.cpp (the offline explainer) share
one OpenMP runtime, libgomp, in the process. libgomp gives each thread that starts parallel work its
own team of worker threads; once the teams outnumber the cores it stops spin-waiting at barriers and
sleeps instead. llama.cpp meets a barrier at every operation of every token, so in the demo, where
Gradio ran each step of a request on whichever of its worker threads was free, the offline explainer
decoded at about 30 tokens/s instead of 50 on 2 cores. With every model call on one thread, PyTorch
and llama.cpp reuse a single team (``bench/demo_latency.py`` measures the difference).

The batched offline explainer is the exception: its llama.cpp context belongs to its own scheduler
thread (``explain/backends/llama_batch.py``), so that several users' answers are decoded in one
batch; the demo runs only compute stages here and waits for explanations on each request's own
thread (``app/model_calls.py``).
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
        self._waiting: set[Future] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            fut, fn, args, kwargs = job
            try:
                if not fut.set_running_or_notify_cancel():
                    continue
            except RuntimeError:  # already settled by shutdown(): its caller has gone
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as e:  # handed to the caller, who re-raises it
                _settle(fut, exception=e)
            else:
                _settle(fut, result=result)

    def _submit(self, fn: Callable, args: tuple = (), kwargs: dict | None = None) -> Future:
        fut: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("the model thread has been shut down")
            self._waiting.add(fut)
        fut.add_done_callback(self._waiting.discard)
        self._jobs.put((fut, fn, args, kwargs or {}))
        return fut

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` run on the model thread; its result, or its exception re-raised here."""
        if threading.current_thread() is self._thread:  # a nested call: waiting on ourselves would deadlock
            return fn(*args, **kwargs)
        return self._submit(fn, args, kwargs).result()

    def iterate(self, gen: Iterator[T]) -> Iterator[T]:
        """``gen``'s items, each one computed on the model thread; closing this generator (a client
        that went away) closes ``gen`` there too."""
        done = False
        try:
            while True:
                item = self.call(next, gen, _END)
                if item is _END:
                    done = True
                    return
                yield item
        finally:
            close = getattr(gen, "close", None)
            if not done and close is not None and not self._closed:
                # Queued, not awaited: Gradio closes a generator on its event loop, which must not
                # wait behind another request's explanation step.
                self._submit(close)

    def shutdown(self) -> None:
        """Take no more jobs; callers still waiting (a server stopping mid-request) get an error now
        instead of holding the process until the step in progress ends."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
        for fut in waiting:
            _settle(fut, exception=RuntimeError("the model thread has been shut down"))
        self._jobs.put(None)


def _settle(fut: Future, result: Any = None, exception: BaseException | None = None) -> None:
    """Complete ``fut`` unless :meth:`ModelThread.shutdown` already did."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except Exception:  # InvalidStateError: settled at shutdown
        pass
