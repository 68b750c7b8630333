"""Contract tests: the third-party behaviour dhumor relies on where no public API offers it.

Each pins exactly what the code uses, so an upgrade that changes it fails here, by name, instead of
silently weakening a guarantee (the request deadline) in a real run."""
from __future__ import annotations

import socket
import threading
import time


def test_urllib3_pool_hands_out_connections_through_get_conn():
    """dhumor/explain/backends/deadline.py notes every connection a request takes (to shut its socket
    at the deadline) by overriding ``HTTPConnectionPool._get_conn`` in pool classes installed through
    ``PoolManager.pool_classes_by_scheme``. requests/urllib3 have no public hook for "the socket of
    the request in flight"; this pins the three facts the deadline needs."""
    import requests
    from urllib3.connectionpool import HTTPConnectionPool

    from dhumor.explain.backends.deadline import DeadlineWatchdog, _WatchedHTTPPool, deadline_session

    assert callable(getattr(HTTPConnectionPool, "_get_conn", None))
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]

    def drip():  # headers, then a body one byte a second: only the deadline ends it
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(30):
            try:
                conn.sendall(b"x")
            except OSError:
                break
            time.sleep(1)
        conn.close()

    threading.Thread(target=drip, daemon=True).start()
    session = deadline_session()
    watchdog = DeadlineWatchdog()
    t0 = time.monotonic()
    try:
        with watchdog.watch(time.monotonic() + 1.5) as w:
            session.get(f"http://127.0.0.1:{port}/", timeout=10)
        raise AssertionError("the dripping answer was not cut at the deadline")
    except requests.RequestException:
        pass
    finally:
        srv.close()
    took = time.monotonic() - t0
    assert w.connections and all(hasattr(c, "sock") for c in w.connections)  # noted through _get_conn
    pool_cls = session.get_adapter("http://x").poolmanager.pool_classes_by_scheme["http"]
    assert pool_cls is _WatchedHTTPPool  # our pool classes are the ones the manager builds
    assert took < 5, f"the deadline held only after {took:.1f} s"
