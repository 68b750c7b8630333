"""A circuit breaker for a remote model server: after ``threshold`` consecutive failed requests the
server is taken as down and further requests fail at once, instead of each waiting out its own
timeouts. After ``cooldown`` seconds one probe request is let through; its success closes the
breaker, its failure keeps it open for another cooldown."""
from __future__ import annotations

import threading
import time


class CircuitBreaker:
    def __init__(self, threshold: int = 4, cooldown: float = 300.0, clock=time.monotonic):
        if threshold < 1:
            raise ValueError("the circuit breaker threshold must be at least 1")
        self.threshold, self.cooldown, self.clock = threshold, cooldown, clock
        self.failures, self.last_error = 0, ""
        self.opened_at: float | None = None
        self._probing = False
        self._lock = threading.Lock()

    @property
    def is_open(self) -> bool:
        return self.opened_at is not None

    def refusal(self) -> str | None:
        """None when a request may go out now, else why not (the server is down)."""
        with self._lock:
            if self.opened_at is None:
                return None
            if not self._probing and self.clock() - self.opened_at >= self.cooldown:
                self._probing = True  # exactly one probe; the others keep failing fast
                return None
            return f"{self.failures} consecutive requests failed, last: {self.last_error}"

    def record(self, error: str | None) -> None:
        """The outcome of a request that went out: ``None`` for success, else its error."""
        with self._lock:
            if error is None:
                self.failures, self.opened_at, self._probing = 0, None, False
                return
            self.failures += 1
            self.last_error = error
            if self._probing or self.failures >= self.threshold:
                self.opened_at, self._probing = self.clock(), False
