"""A hard deadline for an HTTP request made with ``requests``.

``requests`` bounds each socket operation, not the request: a server that drips its answer (or its
headers) a byte at a time, or answers with a chain of slow redirects, keeps a request alive for as
long as it likes. Here every connection a request takes from urllib3's pool is noted against the
thread's current :meth:`DeadlineWatchdog.watch`, and a watchdog thread shuts those sockets down
once the deadline passes: the blocked read fails at once and the request ends with an error.
"""
from __future__ import annotations

import contextlib
import functools
import socket
import threading
import time
from typing import Iterator

import requests
from requests.adapters import HTTPAdapter
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

_current = threading.local()  # the Watch of this thread's request in flight, if any


class Watch:
    """One request's deadline and the connections it has used."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.expired = False
        self.connections: list = []
        self.lock = threading.Lock()

    def note(self, conn) -> None:
        with self.lock:
            self.connections.append(conn)
        if self.expired:  # taken after the deadline (a redirect hop): shut it as well
            self.expire()

    def expire(self) -> None:
        """Shut down every socket of this request (idempotent; safe from any thread)."""
        with self.lock:
            self.expired = True
            conns = list(self.connections)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


class DeadlineWatchdog:
    """Expires watched requests at their deadline; one daemon thread, awake only while one is in flight."""

    def __init__(self, tick: float = 0.1):
        self.tick = tick
        self._watches: set[Watch] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def watch(self, deadline: float) -> Iterator[Watch]:
        """Requests made in this block (on a :func:`deadline_session`) end by ``deadline`` (monotonic)."""
        w = Watch(deadline)
        with self._lock:
            self._watches.add(w)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="dhumor-deadline", daemon=True)
                self._thread.start()
        _current.watch = w
        try:
            yield w
        finally:
            _current.watch = None
            with self._lock:
                self._watches.discard(w)

    def expire_all(self) -> None:
        """End every request in flight now (Ctrl-C)."""
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.expire()

    def _run(self) -> None:
        while True:
            time.sleep(self.tick)
            now = time.monotonic()
            with self._lock:
                if not self._watches:
                    self._thread = None
                    return
                # A connection noted after expiry is shut by note(); re-expiring covers a socket
                # that connected after the first pass.
                late = [w for w in self._watches if now >= w.deadline]
            for w in late:
                w.expire()


class _NotesConnections:
    def _get_conn(self, timeout=None):
        conn = super()._get_conn(timeout)  # type: ignore[misc]
        w = getattr(_current, "watch", None)
        if w is not None:
            w.note(conn)
        return conn


class _WatchedHTTPPool(_NotesConnections, HTTPConnectionPool):
    pass


class _WatchedHTTPSPool(_NotesConnections, HTTPSConnectionPool):
    pass


_POOLS = {"http": _WatchedHTTPPool, "https": _WatchedHTTPSPool}


@functools.lru_cache(maxsize=None)
def _socks_pools() -> dict | None:
    try:
        from urllib3.contrib.socks import SOCKSHTTPConnectionPool, SOCKSHTTPSConnectionPool
    except ImportError:  # no PySocks: requests cannot use a SOCKS proxy at all
        return None
    return {"http": type("_WatchedSOCKSHTTPPool", (_NotesConnections, SOCKSHTTPConnectionPool), {}),
            "https": type("_WatchedSOCKSHTTPSPool", (_NotesConnections, SOCKSHTTPSConnectionPool), {})}


class _WatchedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy, **kwargs):
        manager = super().proxy_manager_for(proxy, **kwargs)
        pools = _socks_pools() if proxy.lower().startswith("socks") else _POOLS  # SOCKS pools are their own classes
        if pools:
            manager.pool_classes_by_scheme = pools
        return manager


def deadline_session() -> requests.Session:
    """A ``requests.Session`` whose requests a :class:`DeadlineWatchdog` can end."""
    s = requests.Session()
    adapter = _WatchedAdapter()
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    return s
