"""Explanations: parsing, the Role-Reversal loop's control flow, caching, and every backend for real
(tiny random LLaVA via transformers, a real llama.cpp OpenAI-compatible server, the offline default)."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from dhumor.cache import StageCache
from dhumor.cli import main
from dhumor.errors import ConfigError
from dhumor.explain import Explainer, ParseError, parse_critique, parse_explanation
from dhumor.explain.backends.base import Backend, Generation
from dhumor.explain.loop import LoopInput, RoleReversalLoop, similarity
from dhumor.explain.prompts import Prompts

ROOT = Path(__file__).resolve().parent.parent
FULL = {"summary": "A cat at the vet.", "implied_joke": "The 'small procedure' is neutering.",
        "narrative_structure": "Setup then punchline.", "emotional_effect": "Dread, then laughter.",
        "dark_attributes": "mutilation", "target": "pet owners"}


# ------------------------------------------------------------------ parsing
def test_parse_plain_fenced_and_wrapped_json():
    for text in (json.dumps(FULL), f"Sure! Here it is:\n```json\n{json.dumps(FULL)}\n```\nHope it helps.",
                 f"Answer: {json.dumps(FULL)} -- done"):
        assert parse_explanation(text).implied_joke == FULL["implied_joke"]


def test_parse_loose_keys_lists_and_sections():
    e = parse_explanation(json.dumps({"Summary": "x y z", "Implied Joke": "a b c", "dark attributes": ["death", "war"],
                                      "Target": None, "tone": "grim"}))
    assert e.dark_attributes == "death, war" and e.target == "" and e.emotional_effect == "grim"
    text = "**Summary**: A cat.\n**Implied joke**: Neutering.\nNarrative structure: setup\n- Target: owners\n"
    e = parse_explanation(text)
    assert (e.summary, e.implied_joke, e.target) == ("A cat.", "Neutering.", "owners")
    assert "Implied joke: Neutering." in e.render()


@pytest.mark.parametrize("text,why", [("", "empty"), ("I cannot help with that.", "no JSON object"),
                                      ('{"summary": "x"}', "no JSON object"),
                                      ('{"summary": "", "implied_joke": "", "target": "t"}', "not a valid explanation")])
def test_parse_failures_say_why(text, why):
    with pytest.raises(ParseError, match=why):
        parse_explanation(text)


def test_parse_critique_shapes():
    crit, rev = parse_critique(json.dumps({"critique": {"summary": "misses the vet", "target": "accurate"},
                                           "revised": FULL}))
    assert "Summary: misses the vet" in crit and rev.target == "pet owners"
    crit, rev = parse_critique("Critique: too vague.\nRevised explanation:\n" + json.dumps(FULL))
    assert crit == "too vague." and rev.summary == FULL["summary"]
    with pytest.raises(ParseError, match="no 'revised'"):
        parse_critique("the explanation is fine")


# ------------------------------------------------------------------ loop control flow
class ScriptedBackend(Backend):
    """Stands in for a model whose answers a test must choose (convergence, repairs, failures);
    the real backends are exercised below."""

    name = "scripted"
    supports_images = False

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    def fingerprint(self):
        return {"backend": self.name}

    def generate(self, requests_):
        out = []
        for r in requests_:
            self.calls.append(r)
            a = self.answers.pop(0)
            out.append(a if isinstance(a, Generation) else Generation(a, 10, 20, 0.01))
        return out


def _revised(**changes):
    return json.dumps({"critique": {"summary": "too vague"}, "revised": {**FULL, **changes}})


def test_loop_runs_all_iterations_and_keeps_the_audit_trail():
    b = ScriptedBackend([json.dumps(FULL), _revised(summary="A cat hears it will be neutered at the vet."),
                         _revised(summary="Completely different text about the vet and the cat's fate.")])
    r = RoleReversalLoop(b, iterations=3, similarity_threshold=0.99).run_many([LoopInput(None, "cap", ["cat"])])[0]
    assert r.ok and [i.iteration for i in r.iterations] == [1, 2, 3]
    assert [i.kind for i in r.iterations] == ["explain", "role_reversal", "role_reversal"]
    assert r.iterations[1].critique == "Summary: too vague" and r.iterations[1].similarity < 0.99
    assert r.final["summary"].startswith("Completely") and r.stop_reason == "completed 3 iterations"
    # Iteration 2's prompt carries the previous explanation and the author role; cues replace the image.
    assert "author and creator" in b.calls[1].user and FULL["implied_joke"] in b.calls[1].user
    assert "image classifier says it shows: cat" in b.calls[0].user


def test_loop_stops_early_when_revisions_converge():
    b = ScriptedBackend([json.dumps(FULL), _revised()])
    r = RoleReversalLoop(b, iterations=5, similarity_threshold=0.9).run_many([LoopInput(None, "cap")])[0]
    assert len(r.iterations) == 2 and r.iterations[1].similarity == 1.0 and r.stop_reason.startswith("converged")
    assert len(b.calls) == 2


def test_repair_then_failure_recorded_with_raw_text():
    # Answers come in batch order: both memes' first answers, then both repairs.
    b = ScriptedBackend(["lol no", "garbage",  # first answers: neither parses
                         json.dumps(FULL), "still garbage"])  # meme 1's repair parses, meme 2's does not
    loop = RoleReversalLoop(b, iterations=1, max_repairs=1)
    ok, bad = loop.run_many([LoopInput(None, "a"), LoopInput(None, "b")])
    assert ok.ok and ok.iterations[0].repaired and ok.iterations[0].raw == ["lol no", json.dumps(FULL)]
    assert "could not be used" in b.calls[2].user and "lol no" in b.calls[2].user  # the repair prompt
    assert bad.status == "failed" and bad.iterations[0].raw == ["garbage", "still garbage"]
    assert "unparseable answer" in bad.error and bad.text is None


def test_later_failure_keeps_the_previous_explanation():
    b = ScriptedBackend([json.dumps(FULL), "nope", "nope again"])
    r = RoleReversalLoop(b, iterations=3, max_repairs=1).run_many([LoopInput(None, "c")])[0]
    assert r.ok and r.final == FULL and len(r.iterations) == 2 and r.iterations[1].error
    assert "iteration 2 failed; kept iteration 1" == r.stop_reason


def test_explainer_caches_results_but_not_backend_failures(tmp_path):
    img = Image.new("RGB", (32, 32), "red")
    cache = StageCache(tmp_path / "c.sqlite")
    b = ScriptedBackend([json.dumps(FULL)])
    ex = Explainer(b, cache=cache, iterations=1)
    first = ex.explain(img, "d" * 64, "caption")
    again = ex.explain(img, "d" * 64, "caption")
    assert first.ok and again.to_dict() == first.to_dict() and len(b.calls) == 1
    assert ex.key("d" * 64, "caption") != ex.key("d" * 64, "other caption")
    assert Explainer(b, iterations=2).key("d" * 64, "c") != Explainer(b, iterations=1).key("d" * 64, "c")
    down = ScriptedBackend([Generation("", error="connection refused"), Generation("", error="connection refused")])
    ex2 = Explainer(down, cache=cache, iterations=1)
    assert not ex2.explain(img, "e" * 64, "c").ok
    assert ex2.cached("e" * 64, "c") is None  # a rerun retries it


def test_prompt_edits_change_the_cache_key(tmp_path):
    src = Path(__file__).resolve().parent.parent / "dhumor" / "explain" / "prompts" / "v1"
    shutil.copytree(src, tmp_path / "v1x")
    a = Prompts.load(directory=tmp_path / "v1x")
    (tmp_path / "v1x" / "explain.txt").write_text(a.texts["explain"] + "\nBe brief.")
    assert Prompts.load(directory=tmp_path / "v1x").id != a.id


def test_similarity():
    assert similarity("A B c", "a  b C") == 1.0 and similarity("abc", "xyz") == 0.0


# ------------------------------------------------------------------ transformers backend on a tiny VLM
@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from tiny_vlm import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.mark.slow
def test_transformers_backend_real_generate_and_failure_recording(tiny_llava):
    from dhumor.explain.backends.transformers_vlm import TransformersVLMBackend

    b = TransformersVLMBackend(str(tiny_llava), batch_size=2)
    img = Image.open(ROOT / "examples" / "chelsea.jpg")
    loop = RoleReversalLoop(b, iterations=2, max_tokens=16, temperature=0.0)
    res = loop.run_many([LoopInput(img, "WHEN THE VET SAYS"), LoopInput(img, "a longer caption for padding")])
    for r in res:  # random weights write random tokens: parsed, repaired once, recorded as failed
        assert r.status == "failed" and len(r.iterations) == 1
        it = r.iterations[0]
        assert len(it.raw) == 2 and all(t.strip() for t in it.raw) and it.completion_tokens > 0
        assert it.error.startswith("unparseable answer")
    assert b.fingerprint()["model"] == str(tiny_llava)


def test_transformers_backend_missing_model_is_a_clear_error(tmp_path):
    from dhumor.errors import WeightsNotFoundError
    from dhumor.explain.backends.transformers_vlm import TransformersVLMBackend

    with pytest.raises(WeightsNotFoundError, match="hf download"):
        TransformersVLMBackend(str(tmp_path / "no-such-model"))


# ------------------------------------------------------------------ openai backend against a real server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed")
    from dhumor.encoders.weights import smollm2_gguf

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(smollm2_gguf()), "--host",
                             "127.0.0.1", "--port", str(port), "--n_ctx", "4096", "--model_alias", "smollm2",
                             "--seed", "0"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path_factory.mktemp("srv") / "log", "w"))
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(300):
        try:
            if requests.get(f"{url}/models", timeout=1).status_code == 200:
                break
        except requests.RequestException:
            pass
        if proc.poll() is not None:
            pytest.fail("llama.cpp server exited before answering")
        time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(30)


@pytest.mark.slow
def test_openai_backend_against_llama_cpp_server(llama_server, tmp_path):
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    b = OpenAIBackend(model="smollm2", base_url=llama_server, send_images=False, concurrency=2,
                      timeout=600)  # a CPU shared with other jobs can take minutes per answer
    ex = Explainer(b, cache=StageCache(tmp_path / "c.sqlite"), iterations=2, max_tokens=300)
    img = Image.open(ROOT / "examples" / "chelsea.jpg")
    r = ex.explain(img, "f" * 64, "WHEN THE VET SAYS / IT'S JUST A SMALL PROCEDURE")
    first = r.iterations[0]
    assert first.prompt_tokens > 50 and first.completion_tokens > 10  # usage reported by the real server
    assert r.ok, r.to_dict()  # JSON-schema output enforced by the server's grammar
    assert set(r.final) == {"summary", "implied_joke", "narrative_structure", "emotional_effect", "dark_attributes",
                            "target"}
    assert r.visual_cues and "cat" in " ".join(r.visual_cues).lower()
    assert b.structured == "json_object"  # stepped down from json_schema, which this server refuses


def test_openai_payload_carries_the_image_for_vision_servers():
    from dhumor.explain.backends.base import GenerationRequest
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    b = OpenAIBackend(model="m", base_url="http://x/v1")
    body = b.payload(GenerationRequest("sys", "hi", Image.new("RGB", (3000, 1500), "blue"), {"type": "object"}))
    part = body["messages"][1]["content"][0]
    assert part["type"] == "image_url" and part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert body["response_format"]["type"] == "json_schema"
    import base64, io  # noqa: E401
    data = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    assert max(Image.open(io.BytesIO(data)).size) == 1024  # downscaled before sending


def test_openai_backend_retries_then_reports_failure():
    from dhumor.explain.backends.base import GenerationRequest
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    b = OpenAIBackend(model="m", base_url=f"http://127.0.0.1:{_free_port()}/v1", max_retries=2, backoff=0.01, timeout=2)
    t = time.time()
    g = b.generate([GenerationRequest("s", "u")])[0]
    assert g.error and "ConnectionError" in g.error and time.time() - t < 10


def test_openai_config_from_environment(monkeypatch):
    from dhumor.explain.backends.openai_compat import OpenAIBackend

    monkeypatch.setenv("DHUMOR_OPENAI_BASE_URL", "http://h:1/v1/")
    monkeypatch.setenv("DHUMOR_OPENAI_MODEL", "qwen")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    b = OpenAIBackend()
    with b._session() as session:
        assert (b.base_url, b.model, session.headers["Authorization"]) == ("http://h:1/v1", "qwen", "Bearer sk-test")
    monkeypatch.delenv("DHUMOR_OPENAI_MODEL")
    with pytest.raises(ConfigError, match="needs the served model"):
        OpenAIBackend()


# ------------------------------------------------------------------ offline default, end to end
@pytest.mark.slow
def test_offline_explain_command_end_to_end_and_resume(tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    src = tmp_path / "memes"
    src.mkdir()
    for name in ("chelsea.jpg", "coffee.jpg"):
        shutil.copy(ROOT / "examples" / name, src / name)
    out = tmp_path / "expl.jsonl"
    rc = main(["explain", str(src), "--out", str(out), "--iterations", "2", "--max-tokens", "250", "--quiet"])
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert rc == (3 if any(r["status"] != "ok" for r in rows) else 0)  # 3: the batch finished with failed rows
    assert [r["id"] for r in rows] == ["chelsea.jpg", "coffee.jpg"]
    for r in rows:
        assert r["caption"] and r["backend"]["backend"].startswith("llama-cpp") and r["prompt_version"][:2] in ("v1", "v2")
        assert 1 <= len(r["iterations"]) <= 2 and r["iterations"][0]["kind"] == "explain"
        if r["status"] == "ok":
            assert r["text"].startswith("Summary:")
    summary = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert summary["explained"] + summary["failed"] == 2 and summary["tokens_per_second"] > 0
    assert main(["explain", str(src), "--out", str(out), "--iterations", "2", "--max-tokens", "250", "--quiet"]) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2


@pytest.mark.slow
def test_offline_fallback_through_transformers_gguf():
    """Without llama-cpp-python the offline default runs SmolLM2 through transformers from the same GGUF
    (converted once, then cached)."""
    from dhumor.explain.backends.base import GenerationRequest
    from dhumor.explain.backends.offline import TransformersGGUFBackend

    b = TransformersGGUFBackend()
    g = b.generate([GenerationRequest("You explain memes.", "Say hello.", max_tokens=8, temperature=0.0)])[0]
    assert g.error is None and g.completion_tokens > 0 and g.text.strip()
    assert TransformersGGUFBackend().fingerprint() == b.fingerprint()  # the second load uses the cached conversion
