"""The demo's streamed path: the decision first (the shipped model does not read explanations), then
each finished Role-Reversal iteration, from a real OpenAI-compatible server on 127.0.0.1."""
from __future__ import annotations

from pathlib import Path

from dhumor.cache import StageCache
from dhumor.explain import create_explainer
from dhumor.inference.pipeline import Pipeline

from test_explain_server_faults import FaultServer

EXAMPLE = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples" / "horse.jpg"


def test_stream_file_decides_first_then_explains_and_ends_like_score_file(tmp_path):
    srv = FaultServer()
    try:
        cache = StageCache(tmp_path / "c.sqlite")
        explainer = create_explainer("openai", cache=cache, iterations=2, model="m", base_url=srv.url)
        pipe = Pipeline.from_checkpoint(cache=cache, explainer=explainer)
        assert "reasoning" not in pipe.streams
        steps = list(pipe.stream_file(EXAMPLE, caption="WHEN THE VET SAYS"))
        assert len(steps) >= 2
        first, last = steps[0], steps[-1]
        assert first["decision"] is not None and first["explanation_pending"] and first["explanation_trail"] is None
        assert not last.get("explanation_pending") and last["explanation_trail"]["status"] == "ok"
        assert last["explanation"] and last["decision"] == first["decision"]
        # The streamed result ends where the one-shot path ends (the explanation now comes from the cache).
        once = pipe.score_file(EXAMPLE, caption="WHEN THE VET SAYS")
        assert once["decision"] == last["decision"] and once["explanation"] == last["explanation"]
        assert srv.requests >= 1
    finally:
        srv.close()
