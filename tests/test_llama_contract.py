"""The llama-cpp-python API the batched offline explainer relies on (explain/backends/llama_batch.py).

llama.cpp's continuous batching has no high-level API in llama-cpp-python, so the backend uses its
public low-level ctypes bindings. These tests pin exactly what is used: each binding's C signature,
the struct fields written and read, the public ``Llama`` members, and the behaviour relied on (a
sequence decoded beside others gets the same answer as alone; a freed slot is reusable). An
upgrade that changes any of it fails here, loudly, instead of in a moderator's demo.
"""
from __future__ import annotations

import ctypes

import pytest

llama_cpp = pytest.importorskip("llama_cpp")

P = ctypes.c_void_p
I32, F32 = ctypes.c_int32, ctypes.c_float

# name -> (argtypes, restype), as llama-cpp-python declares them; pointers compared by kind.
BINDINGS = {
    "llama_context_default_params": ([], llama_cpp.llama_context_params),
    "llama_init_from_model": ([P, llama_cpp.llama_context_params], P),
    "llama_free": ([P], None),
    "llama_model_get_vocab": ([P], P),
    "llama_vocab_get_text": ([P, I32], ctypes.c_char_p),
    "llama_batch_init": ([I32, I32, I32], llama_cpp.llama_batch),
    "llama_batch_free": ([llama_cpp.llama_batch], None),
    "llama_decode": ([P, llama_cpp.llama_batch], I32),
    "llama_get_memory": ([P], P),
    "llama_memory_clear": ([P, ctypes.c_bool], None),
    "llama_memory_seq_rm": ([P, I32, I32, I32], ctypes.c_bool),
    "llama_get_logits_ith": ([P, I32], ctypes.POINTER(F32)),
    "llama_vocab_is_eog": ([P, I32], ctypes.c_bool),
    "llama_token_to_piece": ([P, I32, ctypes.c_char_p, I32, I32, ctypes.c_bool], I32),
    "llama_sampler_chain_default_params": ([], llama_cpp.llama_sampler_chain_params),
    "llama_sampler_chain_init": ([llama_cpp.llama_sampler_chain_params], P),
    "llama_sampler_chain_add": ([P, P], None),
    # llama-cpp-python declares n_vocab first (its own header copy); the sampler chain is built
    # with exactly these arguments, so a change here changes every sampled answer.
    "llama_sampler_init_penalties": ([I32, I32, F32, F32, F32], P),
    "llama_sampler_init_greedy": ([], P),
    "llama_sampler_init_top_k": ([I32], P),
    "llama_sampler_init_top_p": ([F32, ctypes.c_size_t], P),
    "llama_sampler_init_min_p": ([F32, ctypes.c_size_t], P),
    "llama_sampler_init_temp": ([F32], P),
    "llama_sampler_init_dist": ([ctypes.c_uint32], P),
    "llama_sampler_init_grammar": ([P, ctypes.c_char_p, ctypes.c_char_p], P),
    "llama_sampler_apply": ([P, ctypes.POINTER(llama_cpp.llama_token_data_array)], None),
    "llama_sampler_accept": ([P, I32], None),
    "llama_sampler_free": ([P], None),
}


def _kind(t):
    """A ctypes type, with every handle (c_void_p, or a pointer to a sampler, which the backend
    only passes back to llama.cpp) as c_void_p."""
    if t is None:
        return None
    if issubclass(t, ctypes.c_void_p) or (issubclass(t, ctypes._Pointer) and t._type_.__name__ == "llama_sampler"):
        return ctypes.c_void_p
    return t


@pytest.mark.parametrize("name", sorted(BINDINGS))
def test_bindings_keep_their_c_signatures(name):
    fn = getattr(llama_cpp, name, None)
    assert fn is not None, f"llama_cpp.{name} is gone: llama_batch.py uses it"
    args, res = BINDINGS[name]
    got_args = [_kind(a) for a in (fn.argtypes or [])]
    assert got_args == [_kind(a) for a in args], f"llama_cpp.{name} changed its arguments: {fn.argtypes}"
    assert _kind(fn.restype) == _kind(res), f"llama_cpp.{name} changed its result type: {fn.restype}"


def test_structs_keep_the_fields_written_and_read():
    fields = lambda s: dict(s._fields_)  # noqa: E731
    batch = fields(llama_cpp.llama_batch)
    for f in ("n_tokens", "token", "pos", "n_seq_id", "seq_id", "logits"):
        assert f in batch, f"llama_batch.{f}"
    params = fields(llama_cpp.llama_context_params)
    for f in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_threads", "n_threads_batch", "kv_unified"):
        assert f in params, f"llama_context_params.{f}"
    # The sampler fills llama_token_data from a numpy record array of exactly this layout.
    assert [(n, t) for n, t in llama_cpp.llama_token_data._fields_] == [
        ("id", llama_cpp.llama_token), ("logit", F32), ("p", F32)]
    assert ctypes.sizeof(llama_cpp.llama_token_data) == 12
    assert [n for n, *_ in llama_cpp.llama_token_data_array._fields_] == ["data", "size", "selected", "sorted"]


def test_public_python_api_used():
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # noqa: F401
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    for member in ("model", "tokenize", "n_vocab", "token_eos", "token_bos"):
        assert hasattr(Llama, member), f"Llama.{member}"
    gbnf = json_schema_to_gbnf('{"type": "object", "properties": {"a": {"type": "string"}}}')
    assert gbnf.startswith("root ::=") or "\nroot ::=" in gbnf  # the backend names "root" as the start rule


@pytest.fixture(scope="module")
def backend():
    from dhumor.explain.backends.llama_batch import LlamaBatchBackend

    b = LlamaBatchBackend(n_seq=3, n_threads=2)
    yield b
    b.close()


def test_a_sequence_decoded_beside_others_answers_as_alone_and_freed_slots_are_reused(backend):
    from dhumor.explain.backends.base import GenerationRequest

    reqs = [GenerationRequest("Answer briefly.", q, max_tokens=12, temperature=0.0)
            for q in ("Name a colour.", "Name a fruit.", "Name a city.", "Name a tree.", "Name a bird.")]
    assert isinstance(backend.llm.metadata["tokenizer.chat_template"], str)  # an instance attribute of Llama
    alone = [backend.generate([r])[0].text for r in reqs]
    together = [g.text for g in backend.generate(reqs)]  # 5 requests in 3 slots: slots freed and reused
    assert together == alone and all(alone)


def test_closing_frees_the_context(tmp_path):
    from dhumor.explain.backends.base import GenerationRequest
    from dhumor.explain.backends.llama_batch import LlamaBatchBackend

    b = LlamaBatchBackend(n_seq=1, n_threads=1)
    assert b.generate([GenerationRequest("s", "hi", max_tokens=2)])[0].error is None
    b.close()
    assert b.ctx is None
    with pytest.raises(RuntimeError, match="closed"):
        b.generate([GenerationRequest("s", "hi", max_tokens=2)])
