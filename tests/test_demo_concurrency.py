"""Many reviewers at once with the real offline explainer (SmolLM2 on llama.cpp): four clients at
the same moment (two uploads, a caption re-score, a queue folder) all get their decision and their
explanation, decoded together in one llama.cpp batch, and the demo keeps answering afterwards.

Before the scheduler, an /analyze and a /rescore one second apart hung the demo for good (the
batched stream held a non-reentrant lock across its yields on the demo's one model thread)."""
from __future__ import annotations

import json
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.slow  # the real offline explainer, four clients

pytest.importorskip("gradio")
pytest.importorskip("llama_cpp")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_four_clients_at_once_all_get_decision_and_explanation(trained, harmeme_fixture, tmp_path):
    from gradio_client import Client, handle_file

    from dhumor.cache import StageCache
    from dhumor.app.demo import launch
    from dhumor.explain import create_explainer
    from dhumor.app.model_thread import ModelThread
    from dhumor.inference.pipeline import Pipeline
    from dhumor.review.log import ReviewLog

    images = sorted((harmeme_fixture.parent / "images").glob("*.png"))
    root = tmp_path / "queues"
    (root / "memes").mkdir(parents=True)
    for p in images[10:12]:
        shutil.copy(p, root / "memes" / p.name)
    cache = StageCache(tmp_path / "cache.sqlite")
    models = ModelThread()
    pipe = models.call(lambda: Pipeline.from_checkpoint(trained / "export", cache=cache, explainer=create_explainer(
        "offline", cache=cache, iterations=1, threads=2)))
    backend = pipe.explainer.backend
    port = _port()
    demo = launch(pipe, ReviewLog(tmp_path / "r.sqlite"), port=port, block=False, models=models,
                  queue_root=str(root), concurrency=4)
    url = f"http://127.0.0.1:{port}/"
    try:
        clients = [Client(url, verbose=False) for _ in range(4)]
        calls = [lambda c: c.predict(handle_file(str(images[0])), 0.5, api_name="/analyze"),
                 lambda c: c.predict(handle_file(str(images[1])), 0.5, api_name="/analyze"),
                 lambda c: c.predict(handle_file(str(images[2])), "WHEN THE VET SAYS", 0.5, api_name="/rescore"),
                 lambda c: c.predict("memes", "uncertain", 0, "", api_name="/queue_open")]
        t0 = time.monotonic()
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(call, c) for call, c in zip(calls, clients)]
            results = [f.result(timeout=900) for f in futures]  # a hang fails here instead of forever
        took = time.monotonic() - t0
        for out in results[:3]:
            assert any(isinstance(x, str) and x.startswith("## Decision: ") for x in out), out
            expl = next(x for x in out if isinstance(x, str) and ("Explanation" in x or "explanation" in x))
            assert "**Explanation**" in expl and "Iteration 1" in expl, expl
            assert out[-1].startswith("Scored in"), out[-1]
        assert any(isinstance(x, str) and "0 of 2 reviewed" in x for x in results[3]), results[3]
        rows = [json.loads(line) for f in (tmp_path / "queues").rglob("*.jsonl") for line in f.read_text().splitlines()]
        assert len(rows) == 2 and all(r["decision"] and r["explanation_trail"]["iterations"] for r in rows), rows
        # the four clients' answers were decoded together, not one after the other
        assert backend.stats["max_callers"] >= 2 and backend.stats["max_sequences"] >= 3, backend.stats
        # and the demo still answers (a cached explanation now)
        again = clients[0].predict(handle_file(str(images[0])), 0.5, api_name="/analyze")
        assert again[-1].startswith("Scored in")
        print(f"four clients at once: {took:.1f} s; batch stats {backend.stats}")
    finally:
        demo.close()
        models.shutdown()
        backend.close()
