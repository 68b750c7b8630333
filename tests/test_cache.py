"""The stage cache: keyed by content + settings, persistent, safe across processes."""
from __future__ import annotations

import multiprocessing as mp

import numpy as np

from dhumor.cache import StageCache


def test_key_depends_on_content_and_settings():
    k = StageCache.key("abc", {"engine": "a", "v": 1})
    assert k == StageCache.key("abc", {"v": 1, "engine": "a"})  # order of settings does not matter
    assert k != StageCache.key("abd", {"engine": "a", "v": 1})
    assert k != StageCache.key("abc", {"engine": "b", "v": 1})


def test_roundtrip_and_persistence(tmp_path):
    path = tmp_path / "c.sqlite"
    c = StageCache(path)
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    c.put("features", "k1", StageCache.pack_arrays(tokens=arr))
    c.put_many("ocr", [("a", b"x"), ("b", b"y")])
    c.close()
    c2 = StageCache(path)
    np.testing.assert_array_equal(StageCache.unpack_arrays(c2.get("features", "k1"))["tokens"], arr)
    assert c2.get_many("ocr", ["a", "b", "zz"]) == {"a": b"x", "b": b"y"}
    assert c2.get("features", "a") is None  # stages are separate namespaces
    assert c2.count() == 3 and c2.count("ocr") == 2


def _writer(path, start):
    c = StageCache(path)
    for i in range(start, start + 50):
        c.put("s", f"k{i}", str(i).encode())


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "c.sqlite"
    StageCache(path)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), s)) for s in (0, 50, 100)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    c = StageCache(path)
    assert c.count("s") == 150
    assert c.get("s", "k123") == b"123"
