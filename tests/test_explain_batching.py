"""Batched explanation: iterations of different memes share backend calls, prompt v2's partial
critiques, streaming results for the demo, and llama.cpp decoding several answers at once."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from dhumor.cache import StageCache
from dhumor.explain import Explainer, parse_critique
from dhumor.explain.backends.base import Backend, Generation, GenerationRequest
from dhumor.explain.backends.llama_batch import JsonEnd
from dhumor.explain.loop import LoopInput, RoleReversalLoop, changes_schema, explanation_schema
from dhumor.explain.prompts import Prompts
from dhumor.explain.schema import FIELDS, trim_capped

FULL = {"summary": "A cat at the vet.", "implied_joke": "The 'small procedure' is neutering.",
        "narrative_structure": "Setup then punchline.", "emotional_effect": "Dread, then laughter.",
        "dark_attributes": "mutilation", "target": "pet owners"}


class EchoBackend(Backend):
    """Answers by the kind of prompt it gets (explain or critique) and records every call's batch,
    so a test can see which memes' iterations travelled together."""

    name = "echo"

    def __init__(self, changes_for=lambda user: {"summary": "rewritten " + user[-12:]}):
        self.batches, self.changes_for = [], changes_for

    def fingerprint(self):
        return {"backend": self.name}

    def generate(self, reqs):
        self.batches.append(["critique" if "author and creator" in r.user else "explain" for r in reqs])
        out = []
        for r in reqs:
            if "author and creator" in r.user:
                out.append(Generation(json.dumps({"critique": "too vague", "changes": self.changes_for(r.user)}), 5, 7))
            else:
                out.append(Generation(json.dumps({**FULL, "summary": "cap " + r.user.split("Caption text: ")[1][:8]}), 5, 9))
        return out


def test_partial_critique_is_laid_over_the_previous_explanation():
    crit, rev = parse_critique(json.dumps({"critique": "target is wrong", "changes": {"target": "vets"}}), FULL)
    assert crit == "target is wrong" and rev.target == "vets" and rev.summary == FULL["summary"]
    crit, rev = parse_critique(json.dumps({"critique": "all good", "changes": {}}), FULL)
    assert rev.model_dump() == FULL
    crit, rev = parse_critique(json.dumps({"critique": "fine"}), FULL)  # no changes key at all: nothing changes
    assert rev.model_dump() == FULL
    with pytest.raises(ValueError, match="revised"):
        parse_critique(json.dumps({"critique": "fine"}))  # without the previous explanation there is nothing to keep


def test_v2_prompts_ask_for_changes_only_and_converge_when_nothing_changes():
    p = Prompts.load("v2")
    assert p.settings["critique"] == "changes" and p.id != Prompts.load("v1").id
    b = EchoBackend(changes_for=lambda user: {})
    loop = RoleReversalLoop(b, prompts=p, iterations=3)
    r = loop.run_many([LoopInput(None, "a caption", ["cat"])])[0]
    assert r.ok and len(r.iterations) == 2 and r.stop_reason.startswith("converged")
    req = loop._critique(LoopInput(None, "c", ["cat"]), FULL)
    assert req.json_schema == changes_schema(p.settings["field_chars"])
    # the token cap fits six fields at the character cap (critique_tokens 1.0 in v2)
    assert req.max_tokens == max(loop.max_tokens, 6 * p.settings["field_chars"] // 3 + 64)
    assert loop._first(LoopInput(None, "c", ["cat"])).max_tokens == req.max_tokens > loop.max_tokens
    assert loop.settings()["fields_tokens"] == req.max_tokens  # part of the cache key
    v1 = RoleReversalLoop(b, prompts=Prompts.load("v1"))
    assert v1._first(LoopInput(None, "c", ["cat"])).max_tokens == 400 and "fields_tokens" not in v1.settings()


def test_v2_caps_every_field_through_the_schema_and_ends_a_cut_field_at_a_sentence():
    p = Prompts.load("v2")
    cap = p.settings["field_chars"]
    assert isinstance(cap, int) and 20 <= cap <= 400
    loop = RoleReversalLoop(EchoBackend(), prompts=p)
    first = loop._first(LoopInput(None, "c", ["cat"])).json_schema
    assert first == explanation_schema(cap) and all(first["properties"][f]["maxLength"] == cap for f in FIELDS)
    crit = loop._critique(LoopInput(None, "c", ["cat"]), FULL).json_schema
    assert crit["properties"]["critique"]["maxLength"] == cap
    assert all(v["maxLength"] == cap for v in crit["properties"]["changes"]["properties"].values())
    assert "maxLength" not in str(RoleReversalLoop(EchoBackend(), prompts=Prompts.load("v1"))._first(
        LoopInput(None, "c", ["cat"])).json_schema)  # v1 keeps the paper's uncapped answers

    class Rambler(EchoBackend):  # writes the summary up to the cap, as a grammar-capped model would
        def generate(self, reqs):
            long = ("The cat went to the vet. " * 40)[: cap - 10] + "and then the"
            return [Generation(json.dumps({**FULL, "summary": long[:cap]}), 5, 9) for _ in reqs]

    r = RoleReversalLoop(Rambler(), prompts=p, iterations=1).run_many([LoopInput(None, "c", ["cat"])])[0]
    assert r.ok and r.final["summary"].endswith("vet.") and len(r.final["summary"]) < cap
    assert r.final["target"] == FULL["target"]  # fields under the cap are untouched


def test_trim_capped_keeps_text_under_the_cap_and_cuts_at_the_last_sentence():
    assert trim_capped("One. Two and", 100) == "One. Two and"  # under the cap: as written
    text = "A first sentence here. A second one ends. Then a third that is cut off in the mid"
    assert trim_capped(text, len(text)) == "A first sentence here. A second one ends."
    assert trim_capped("no sentence end at all in this text, just words", 48).endswith("words…")
    assert trim_capped("Hi. " + "x" * 60, 64) == "Hi. " + "x" * 60 + "…"  # a sentence end too early to keep
    assert trim_capped("e.g. this", None) == "e.g. this"
    quoted = ("He called it \"art.\" " * 8)[:70] + "and then"  # a full stop inside closing quotes ends a sentence
    assert trim_capped(quoted, len(quoted)).endswith('art."')
    longer = "Too long. " * 30 + "from a backend that ignores the cap"
    assert trim_capped(longer, 100) == longer.strip()  # not stopped at the cap: nothing to repair
    cut = trim_capped("no sentence end at all in this text, just words", 48)
    assert trim_capped(cut, 48) == cut  # a field kept from the previous iteration gains no second ellipsis


def test_a_capped_field_kept_by_later_critiques_is_not_trimmed_again():
    p = Prompts.load("v2")
    cap = p.settings["field_chars"]

    class Capped(EchoBackend):  # explanation: a summary stopped by the cap with no sentence end
        def generate(self, reqs):
            out = []
            for r in reqs:
                if "author and creator" in r.user:
                    out.append(Generation(json.dumps({"critique": "target", "changes": {"target": r.user[-20:]}}), 5, 7))
                else:
                    out.append(Generation(json.dumps({**FULL, "summary": ("word " * 100)[:cap]}), 5, 9))
            return out

    r = RoleReversalLoop(Capped(), prompts=p, iterations=3, similarity_threshold=1.01).run_many(
        [LoopInput(None, "c", ["cat"])])[0]
    assert r.ok and len(r.iterations) == 3
    assert [it.explanation["summary"].count("…") for it in r.iterations] == [1, 1, 1]


def test_prompt_settings_reject_a_bad_field_cap(tmp_path):
    for name in ("system", "explain", "critique", "repair", "image_line_attached", "image_line_cues"):
        (tmp_path / f"{name}.txt").write_text(name)
    for bad in ('"300"', "5", "true", "3.5", "1001"):
        (tmp_path / "settings.json").write_text('{"field_chars": %s}' % bad)
        with pytest.raises(ValueError, match="settings.json: field_chars"):
            Prompts.load(directory=tmp_path)
    (tmp_path / "settings.json").write_text('{"field_chars": null}')
    assert Prompts.load(directory=tmp_path).settings["field_chars"] is None


def test_iterations_of_different_memes_share_backend_calls():
    # Meme 1's author changes nothing: it converges at iteration 2 and its place goes to meme 3 at once.
    b = EchoBackend(changes_for=lambda user: {} if "meme number 1" in user else {"summary": "new " + user[-30:]})
    loop = RoleReversalLoop(b, prompts=Prompts.load("v2"), iterations=3, similarity_threshold=0.99)
    inputs = [LoopInput(None, f"meme number {i}", ["cat"]) for i in range(5)]
    events = [(i, r, d, len(r.iterations)) for i, r, d in loop.run_iter(inputs, slots=3)]
    done = {i: r for i, r, d, _ in events if d}
    assert sorted(done) == [0, 1, 2, 3, 4] and len(done[1].iterations) == 2
    assert all(len(done[i].iterations) == 3 for i in (0, 2, 3, 4))
    assert b.batches[:3] == [["explain"] * 3, ["critique"] * 3, ["critique", "critique", "explain"]]
    assert max(len(x) for x in b.batches) <= 3
    assert sum(len(x) for x in b.batches) == 14  # 4 memes x 3 iterations + 1 x 2, no request twice
    assert [n for i, _, _, n in events if i == 0] == [1, 2, 3]  # yielded after every iteration


def test_explain_iter_streams_each_iteration_then_caches(tmp_path):
    b = EchoBackend()
    ex = Explainer(b, cache=StageCache(tmp_path / "c.sqlite"), iterations=3, similarity_threshold=1.01,
                   prompts=Prompts.load("v2"))
    ex.cues = None  # the test backend needs no visual cues (no image classifier)
    img = Image.new("RGB", (8, 8))
    seen = [(len(r.iterations), r.stop_reason) for r in ex.explain_iter(img, "a" * 64, "caption")]
    assert seen == [(1, ""), (2, ""), (3, "completed 3 iterations")]
    again = list(ex.explain_iter(img, "a" * 64, "caption"))
    assert len(again) == 1 and len(again[0].iterations) == 3 and len(b.batches) == 3  # from the cache


def test_json_end_detector_ignores_braces_in_strings():
    j = JsonEnd()
    assert j.feed('Sure: {"a": "x}y", "b": {"c": "\\"}"}') is None
    assert j.feed("} trailing") == 1


@pytest.fixture(scope="module")
def llama_batch():
    pytest.importorskip("llama_cpp")
    from dhumor.explain.backends.llama_batch import LlamaBatchBackend

    return LlamaBatchBackend(n_seq=3, n_threads=2)


def test_llama_batch_decodes_several_answers_and_refills_slots(llama_batch):
    word = {"type": "object", "properties": {"word": {"type": "string", "maxLength": 12}}, "required": ["word"]}
    reqs = [GenerationRequest("You answer in JSON.", f"One word for: {c}", json_schema=word, max_tokens=m)
            for c, m in [("cats", 40), ("monday", 3), ("vets", 40), ("taxes", 40)]]
    gens = llama_batch.generate(reqs)  # 4 requests, 3 slots: the short one's slot goes to the fourth
    assert all(g.error is None for g in gens), [g.error for g in gens]
    assert gens[1].completion_tokens == 3  # cut at max_tokens
    for g in (gens[0], gens[2], gens[3]):
        # grammar-constrained, and generation stopped right at the closing brace
        assert list(json.loads(g.text, strict=False)) == ["word"] and g.text.rstrip().endswith("}") and g.completion_tokens < 40
        assert len(json.loads(g.text, strict=False)["word"]) <= 12  # the grammar enforces the schema's maxLength
    # A request too long for its sequence's context fails alone.
    huge = GenerationRequest("s", "word " * 3000, max_tokens=10)
    g_bad, g_ok = llama_batch.generate([huge, reqs[1]])
    assert g_bad.error and "exceed the context" in g_bad.error and g_ok.error is None


def test_llama_batch_continuous_stream_takes_requests_as_slots_free(llama_batch):
    word = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 6}}, "required": ["w"]}
    queue = [(i, GenerationRequest("JSON only.", f"A word about {i}", json_schema=word, max_tokens=30)) for i in range(5)]
    asked = []

    def pull(n):
        asked.append(n)
        take, queue[:] = queue[:n], queue[n:]
        return take

    got = dict(llama_batch.stream(pull))
    assert sorted(got) == [0, 1, 2, 3, 4] and all(json.loads(g.text, strict=False) for g in got.values())
    assert asked[0] == 3 and any(0 < n < 3 for n in asked[1:])  # refilled one or two slots at a time


def test_parser_accepts_raw_newlines_inside_strings():
    from dhumor.explain import parse_explanation

    text = json.dumps(FULL).replace("Setup then punchline.", "Setup,\\nthen punchline.").replace("\\n", "\n")
    assert parse_explanation(text).narrative_structure == "Setup,\nthen punchline."


def test_llama_batch_refuses_a_schema_it_cannot_turn_into_a_grammar(llama_batch):
    # llama.cpp gives up on a grammar spelling out 2,000 characters; that request fails alone and
    # visibly instead of decoding unconstrained.
    huge = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 2000}}, "required": ["a"]}
    bad, ok = llama_batch.generate([GenerationRequest("s", "u", json_schema=huge, max_tokens=5),
                                    GenerationRequest("s", "say hi", max_tokens=3)])
    assert bad.error and "could not build a grammar" in bad.error and bad.completion_tokens == 0
    assert ok.error is None and ok.completion_tokens == 3


def test_llama_batch_serves_concurrent_callers_in_one_batch_without_deadlock(llama_batch):
    # The old backend held a lock across its stream's yields: a second stream on the thread holding
    # a suspended one (the demo's model thread) waited forever. Now: one stream suspended mid-way,
    # a second caller on the same thread and two on other threads all finish.
    import threading

    word = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 6}}, "required": ["w"]}

    def reqs(tag, n):
        return [GenerationRequest("JSON only.", f"A word about {tag} {i}", json_schema=word, max_tokens=20)
                for i in range(n)]

    alone = {tag: [g.text for g in llama_batch.generate(reqs(tag, 2))] for tag in ("cats", "dogs", "vets")}
    first = reqs("cats", 2)
    suspended = llama_batch.stream(lambda n, q=list(enumerate(first)): [q.pop(0) for _ in range(min(n, len(q)))])
    k0, g0 = next(suspended)  # this caller now sits between two answers, nothing read further
    results, errors = {}, []

    def other(tag):
        try:
            results[tag] = [g.text for g in llama_batch.generate(reqs(tag, 2))]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=other, args=(t,)) for t in ("dogs",)]
    for t in threads:
        t.start()
    other("vets")  # on the thread that holds the suspended stream: the old deadlock
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads)
    rest = dict([(k0, g0), *suspended])
    got = {"cats": [rest[0].text, rest[1].text], **results}
    # Each request's answer is its own (seeded by the request), whoever it shared the batch with.
    assert got == alone


def test_llama_batch_drops_a_closed_callers_sequences(llama_batch):
    word = {"type": "object", "properties": {"w": {"type": "string", "maxLength": 6}}, "required": ["w"]}
    many = [(i, GenerationRequest("JSON only.", f"Word {i}", json_schema=word, max_tokens=30)) for i in range(6)]
    gen = llama_batch.stream(lambda n: [many.pop(0) for _ in range(min(n, len(many)))])
    next(gen)
    gen.close()  # a client that went away: its answers in progress are dropped, the slots freed
    g = llama_batch.generate([GenerationRequest("JSON only.", "say hi", max_tokens=3)])[0]
    assert g.error is None and g.completion_tokens == 3


def test_explain_run_turns_one_ocr_failure_into_that_memes_row(tmp_path):
    """`dhumor explain` reads and OCRs through the pipeline's preprocess: an engine that fails on one image
    gives that meme a failed row (permanent: not retried) and the others are explained."""
    import shutil

    from dhumor.inference.explain_run import run_explain
    from dhumor.inference.items import collect_items
    from dhumor.ocr import OCRFailed

    ex = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples"
    for name in ("chelsea.jpg", "coffee.jpg", "horse.jpg"):
        shutil.copy(ex / name, tmp_path / name)

    class PickyOCR:
        engine = "picky"

        def read(self, img, digest):
            if digest == _sha(tmp_path / "coffee.jpg"):
                raise OCRFailed("picky", ValueError("cannot resize this one"))
            return "WHEN THE VET SAYS"

    out = tmp_path / "expl.jsonl"
    items = collect_items(tmp_path)
    s = run_explain(Explainer(EchoBackend(), iterations=1, batch_size=4), items, str(out), ocr=PickyOCR(),
                    progress=False)
    rows = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"chelsea.jpg", "coffee.jpg", "horse.jpg"} and s.unreadable == 1 and s.explained == 2
    bad = rows["coffee.jpg"]
    assert bad["status"] == "failed" and "cannot resize" in bad["error"] and bad["error_kind"] == "permanent"
    assert not bad["retry"] and rows["horse.jpg"]["status"] == "ok" and rows["horse.jpg"]["caption"] == "WHEN THE VET SAYS"


def _sha(path):
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
