"""SmolLM2 on llama.cpp, many answers decoded together: one context with ``n_seq`` sequences, one
``llama_decode`` per step for all of them (llama-cpp-python's low-level batch API).

On a small CPU a decode step of one token costs nearly as much as a step of eight (the weights are
read once per step either way), so decoding several memes' answers side by side multiplies
throughput. One scheduler thread owns the context: requests from any number of callers (two users
of the demo, a queue folder being scored) arrive through a queue and are decoded in the same batch,
and nothing is locked while a caller's stream is suspended. Each sequence has its own sampler chain
(repeat penalty, JSON-schema grammar, seeded sampling), the same chain ``Llama.create_chat_completion`` builds, and stops at end-of-generation,
at ``max_tokens``, at a stop string, or when its top-level JSON object closes.
"""
from __future__ import annotations

import collections
import ctypes
import json
import os
import queue
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from dhumor.encoders.weights import smollm2_gguf
from dhumor.explain.backends.base import Backend, Generation, GenerationRequest, chat_messages


class JsonEnd:
    """Watches text as it streams and says when the first top-level JSON object has closed
    (string- and escape-aware), so generation can stop there instead of running on."""

    def __init__(self):
        self.depth, self.in_str, self.esc, self.started = 0, False, False, False

    def feed(self, text: str) -> int | None:
        """Feed more text; the index in ``text`` just past the closing brace, or None."""
        for i, ch in enumerate(text):
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif ch == "\\":
                    self.esc = True
                elif ch == '"':
                    self.in_str = False
            elif ch == '"' and self.started:
                self.in_str = True
            elif ch == "{":
                self.depth += 1
                self.started = True
            elif ch == "}" and self.started:
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
        return None


@dataclass
class _Seq:
    """One answer being decoded: its caller, its slot in the context, its sampler and what it has produced."""

    client: "_Client"
    key: Any
    slot: int
    prompt: list[int]
    max_tokens: int
    sampler: Any
    stops: tuple[str, ...]
    feed: list[int] = field(default_factory=list)  # tokens to decode next
    pos: int = 0
    out: bytearray = field(default_factory=bytearray)
    n_out: int = 0
    seconds: float = 0.0
    json_end: JsonEnd = field(default_factory=JsonEnd)
    text: str | None = None  # set when finished

    def __post_init__(self):
        self.feed = list(self.prompt)

    def finish(self, text: str) -> None:
        self.text = text


class _Client:
    """One caller of :meth:`LlamaBatchBackend.stream`: its answers come back on its own queue; ``gone``
    when it stopped listening (its sequences are then dropped at the next step)."""

    def __init__(self):
        self.answers: queue.SimpleQueue = queue.SimpleQueue()
        self.gone = False


_CLOSE = object()


class LlamaBatchBackend(Backend):
    """llama.cpp with ``n_seq`` answers decoded side by side (see the module docstring).

    One scheduler thread owns the llama.cpp context; :meth:`stream` and :meth:`generate` may be called
    from any number of threads at once, and their requests share the scheduler's batch."""

    name = "llama-cpp"  # same outputs' family as the one-at-a-time backend; fingerprint says "batched"
    supports_images = False

    def __init__(self, model_path: str | None = None, n_seq: int = 8, n_ctx_per_seq: int = 2048,
                 n_threads: int | None = None, seed: int = 0, repeat_penalty: float = 1.1, top_k: int = 40,
                 top_p: float = 0.95, min_p: float = 0.05, stop_at_json_end: bool = True, n_ubatch: int = 512,
                 decode_threads: int = 1):
        import llama_cpp
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.model_path = str(model_path or smollm2_gguf())
        self.n_seq, self.seed, self.repeat_penalty = max(1, n_seq), seed, repeat_penalty
        self.top_k, self.top_p, self.min_p, self.stop_at_json_end = top_k, top_p, min_p, stop_at_json_end
        self.n_ctx_per_seq = n_ctx_per_seq
        threads = n_threads or os.cpu_count() or 1
        self._lc = llama_cpp
        # The Llama object supplies the model, the tokenizer and the chat template (its public API);
        # its own small context is unused. The batch context is made here with llama.cpp's public C
        # API (llama-cpp-python's ctypes bindings) because Llama() cannot ask for n_seq_max.
        # tests/test_llama_contract.py pins every binding and struct field used here.
        self.llm = Llama(model_path=self.model_path, n_ctx=256, n_threads=threads, seed=seed, verbose=False)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_seq * n_ctx_per_seq
        params.n_batch, params.n_ubatch = 2048, n_ubatch
        params.n_seq_max = self.n_seq
        # A step of several tokens (prompts, several answers) runs on ``threads``; a step of one token
        # (a single answer: the demo) on ``decode_threads``. llama.cpp's threads meet at a barrier
        # after every operation, hundreds per token: on a CPU shared with other work one descheduled
        # thread stalls the rest, and two threads decoded a lone answer at 2-5 tokens/s beside one
        # busy process, where one thread keeps ~45 (and ~50 idle, against ~60 for two).
        params.n_threads, params.n_threads_batch = max(1, decode_threads), threads
        params.kv_unified = False  # sequences share no prefix worth keeping: separate KV streams are faster
        self.ctx = llama_cpp.llama_init_from_model(self.llm.model, params)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {params.n_ctx} tokens for {self.model_path}")
        self.batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
        self.n_batch = params.n_batch
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.n_vocab = self.llm.n_vocab()
        meta = self.llm.metadata
        self.formatter = Jinja2ChatFormatter(
            template=meta["tokenizer.chat_template"], eos_token=self._text(self.llm.token_eos()),
            bos_token=self._text(self.llm.token_bos()), add_generation_prompt=True)
        self._grammars: dict[str, str] = {}
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # (client, key, request), or _CLOSE
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self._broken: str | None = None  # why the scheduler stopped, when it did
        self.stats = {"steps": 0, "max_sequences": 0, "max_callers": 0}  # how much was decoded together

    def fingerprint(self) -> dict:
        # Thread and sequence counts change speed, not what a sequence's sampler does.
        return {"backend": "llama-cpp-batch", "model": os.path.basename(self.model_path),
                "size": os.path.getsize(self.model_path), "seed": self.seed, "repeat_penalty": self.repeat_penalty,
                "sampling": [self.top_k, self.top_p, self.min_p], "stop_at_json_end": self.stop_at_json_end}

    # ------------------------------------------------------------ pieces
    def _text(self, token: int) -> str:
        return self._lc.llama_vocab_get_text(self.vocab, token).decode("utf-8")

    def _grammar(self, schema: dict) -> str:
        from llama_cpp.llama_grammar import json_schema_to_gbnf

        key = json.dumps(schema, sort_keys=True)
        if key not in self._grammars:
            self._grammars[key] = json_schema_to_gbnf(json.dumps(schema))
        return self._grammars[key]

    def _sampler(self, req: GenerationRequest, seed: int) -> "_Sampler":
        lc = self._lc
        chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())
        lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_penalties(self.n_vocab, 64, self.repeat_penalty,
                                                                          0.0, 0.0))
        if req.temperature <= 0:
            lc.llama_sampler_chain_add(chain, lc.llama_sampler_init_greedy())
        else:
            for s in (lc.llama_sampler_init_top_k(self.top_k), lc.llama_sampler_init_top_p(self.top_p, 1),
                      lc.llama_sampler_init_min_p(self.min_p, 1), lc.llama_sampler_init_temp(req.temperature),
                      lc.llama_sampler_init_dist(seed & 0xFFFFFFFF)):
                lc.llama_sampler_chain_add(chain, s)  # the chain owns (and frees) what is added to it
        grammar = None
        if req.json_schema:
            grammar = lc.llama_sampler_init_grammar(self.vocab, self._grammar(req.json_schema).encode(), b"root")
            if not grammar:  # llama.cpp could not build it: decoding unconstrained would hide that
                lc.llama_sampler_free(chain)
                raise ValueError("llama.cpp could not build a grammar from this request's JSON schema")
        return _Sampler(lc, chain, grammar, self.n_vocab)

    def _tokens(self, req: GenerationRequest) -> list[int]:
        prompt = self.formatter(messages=chat_messages(req, False)).prompt
        return self.llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)

    def _piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._lc.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lc.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    # ------------------------------------------------------------ generation (any thread)
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        todo = list(enumerate(requests))
        out: list[Generation | None] = [None] * len(requests)

        def pull(n: int):
            take, todo[:] = todo[:n], todo[n:]
            return take

        for i, g in self.stream(pull):
            out[i] = g
        return out  # type: ignore[return-value]

    def stream(self, pull: Callable[[int], list[tuple[Any, GenerationRequest]]]) -> Iterator[tuple[Any, Generation]]:
        """Continuous batching: ``pull(n)`` is asked for up to ``n`` new ``(key, request)`` whenever
        this caller has fewer than ``n_seq`` answers pending, and ``(key, generation)`` comes back as
        each answer finishes, so a short answer's place goes to the next request at once. Ends when
        pull returns nothing and every answer is out.

        Safe to call from many threads at once: requests go to the scheduler thread's queue and are
        decoded in one batch with every other caller's; nothing is locked while this generator is
        suspended, and closing it early drops its sequences from the batch."""
        self._ensure_scheduler()
        client, pending = _Client(), 0
        try:
            while True:
                new = pull(self.n_seq - pending) if pending < self.n_seq else []
                for key, req in new:
                    self._inbox.put((client, key, req))
                    pending += 1
                if not pending:
                    return
                key, gen = self._answer(client)
                pending -= 1
                yield key, gen
        finally:
            client.gone = pending > 0

    def _answer(self, client: _Client) -> tuple[Any, Generation]:
        while True:
            try:
                return client.answers.get(timeout=1.0)
            except queue.Empty:  # never wait forever on a scheduler that has died
                if self._broken is not None or self._thread is None or not self._thread.is_alive():
                    raise RuntimeError(f"the llama.cpp scheduler stopped: {self._broken or 'closed'}") from None

    def _ensure_scheduler(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"the llama.cpp scheduler stopped: {self._broken}")
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="dhumor-llama-batch", daemon=True)
                self._thread.start()

    def close(self) -> None:
        """Stop the scheduler (pending callers get an error) and free the context."""
        with self._start:
            thread, self._thread = self._thread, None
            self._broken = self._broken or "closed"
        if thread is not None:
            self._inbox.put(_CLOSE)
            thread.join(10)
        if not (thread and thread.is_alive()) and self.ctx:
            self._lc.llama_batch_free(self.batch)
            self._lc.llama_free(self.ctx)
            self.ctx = None

    # ------------------------------------------------------------ the scheduler (its own thread)
    def _serve(self) -> None:
        """The one thread that touches the context: takes requests from the queue into free
        sequence slots, decodes every active sequence in one batch per step, hands each finished
        answer to its caller."""
        active: list[_Seq] = []
        waiting: collections.deque = collections.deque()
        try:
            self._schedule(active, waiting)
        except BaseException as e:  # a bug here must not leave callers waiting forever
            self._broken = f"{type(e).__name__}: {e}"
            err = Generation("", error=f"the llama.cpp scheduler stopped: {self._broken}")
            for s in active:
                s.client.answers.put((s.key, err))
            for client, key, _ in waiting:
                client.answers.put((key, err))
            if not isinstance(e, Exception):
                raise

    def _schedule(self, active: list[_Seq], waiting: collections.deque) -> None:
        lc = self._lc
        mem = lc.llama_get_memory(self.ctx)
        lc.llama_memory_clear(mem, True)
        free = list(range(self.n_seq))

        def release(s: _Seq) -> None:
            active.remove(s)
            lc.llama_memory_seq_rm(mem, s.slot, -1, -1)
            free.append(s.slot)
            s.sampler.close()

        while True:
            # Wait for work only when there is nothing to decode; otherwise take what has arrived.
            try:
                item = self._inbox.get(block=not active and not waiting)
                while True:
                    if item is _CLOSE:
                        raise _Closed
                    waiting.append(item)
                    item = self._inbox.get_nowait()
            except queue.Empty:
                pass
            except _Closed:
                for s in list(active):
                    release(s)
                    s.client.answers.put((s.key, Generation("", error="the llama.cpp backend was closed")))
                for client, key, _ in waiting:
                    client.answers.put((key, Generation("", error="the llama.cpp backend was closed")))
                waiting.clear()
                return
            for s in [s for s in active if s.client.gone]:  # its caller stopped listening
                release(s)
            while free and waiting:
                client, key, req = waiting.popleft()
                if client.gone:
                    continue
                s, err = self._admit(client, key, req, free[0])
                if err is not None:
                    client.answers.put((key, err))
                    continue
                free.pop(0)
                active.append(s)
            if not active:
                continue
            st = self.stats
            st["steps"] += 1
            st["max_sequences"] = max(st["max_sequences"], len(active))
            st["max_callers"] = max(st["max_callers"], len({id(s.client) for s in active}))
            t0 = time.perf_counter()
            try:
                finished = self._step(active)
            except RuntimeError as e:  # a failed decode: these answers fail, the others go on
                lc.llama_memory_clear(mem, True)
                for s in list(active):
                    release(s)
                    s.client.answers.put((s.key, Generation("", len(s.prompt), s.n_out, s.seconds,
                                                            error=f"RuntimeError: {e}")))
                continue
            share = (time.perf_counter() - t0) / len(active)
            for s in active:
                s.seconds += share
            for s in finished:
                release(s)
                s.client.answers.put((s.key, Generation(s.text or "", len(s.prompt), s.n_out, s.seconds)))

    def _admit(self, client: _Client, key, req: GenerationRequest, slot: int):
        try:
            toks = self._tokens(req)
            if len(toks) + req.max_tokens > self.n_ctx_per_seq:
                raise ValueError(f"prompt of {len(toks)} tokens + max_tokens {req.max_tokens} exceed the "
                                 f"context of {self.n_ctx_per_seq} tokens per sequence")
            # The sampler's seed follows the request, not its place in a batch: reruns sample alike.
            seed = self.seed + zlib.crc32(f"{req.system}\0{req.user}".encode())
            return _Seq(client, key, slot, toks, req.max_tokens, self._sampler(req, seed),
                        tuple(req.stop or ())), None
        except Exception as e:  # one bad request must not stop the others
            return None, Generation("", error=f"{type(e).__name__}: {e}")

    def _step(self, active: list[_Seq]) -> list[_Seq]:
        """Feed every active sequence its pending tokens (a new prompt, or the last sampled token)
        in batches of ``n_batch``, sampling each sequence as soon as its last token is decoded;
        returns the sequences that finished."""
        entries = [(s, t, s.pos + j, j == len(s.feed) - 1) for s in active for j, t in enumerate(s.feed)]
        b, finished = self.batch, []
        for c in range(0, len(entries), self.n_batch):
            chunk = entries[c:c + self.n_batch]
            for i, (s, tok, pos, want) in enumerate(chunk):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, want
                b.seq_id[i][0] = s.slot
            b.n_tokens = len(chunk)
            rc = self._lc.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            for i, (s, _, _, want) in enumerate(chunk):
                if want:
                    s.pos += len(s.feed)
                    s.feed = []
                    if self._sample(s, i):
                        finished.append(s)
        return finished

    def _sample(self, s: _Seq, row: int) -> bool:
        """Sample the next token of ``s`` from logits row ``row``; True when ``s`` is finished."""
        tok = s.sampler.sample(self.ctx, row)
        s.n_out += 1
        if self._lc.llama_vocab_is_eog(self.vocab, tok):
            s.text = s.out.decode("utf-8", "replace")
            return True
        piece = self._piece(tok)
        s.out += piece
        if self._check_end(s, piece):
            return True
        if s.n_out >= s.max_tokens:
            s.text = s.out.decode("utf-8", "replace")
            return True
        s.feed = [tok]
        return False

    def _check_end(self, s: _Seq, piece: bytes) -> bool:
        """True when the answer is complete: a stop string appeared, or its JSON object closed."""
        text = s.out.decode("utf-8", "ignore")
        for stop in s.stops:
            at = text.find(stop)
            if at >= 0:
                s.finish(text[:at])
                return True
        if self.stop_at_json_end:
            end = s.json_end.feed(piece.decode("utf-8", "ignore"))
            if end is not None:
                s.finish(text)
                return True
        return False


class _Closed(Exception):
    pass


_TOKEN_DATA = None


class _Sampler:
    """One sequence's sampling, as llama.cpp's own ``common_sampler`` does it: sample with the
    chain (penalties, top-k/p, min-p, temperature, seeded draw), then check only that token against
    the JSON grammar; only when the grammar rejects it, constrain the whole vocabulary and sample
    again. Checking one token instead of ~49k per step is what makes constrained decoding cheap."""

    def __init__(self, lc, chain, grammar, n_vocab: int):
        import numpy as np

        global _TOKEN_DATA
        if _TOKEN_DATA is None:
            _TOKEN_DATA = np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        self.lc, self.chain, self.grammar, self.n_vocab, self.np = lc, chain, grammar, n_vocab, np
        self.cand = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self.ids = np.arange(n_vocab, dtype=np.int32)
        self.one = (lc.llama_token_data * 1)()
        self.grammar_resamples = 0

    def _candidates(self, ctx, row: int):
        logits = self.np.ctypeslib.as_array(self.lc.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
        self.cand["id"], self.cand["logit"], self.cand["p"] = self.ids, logits, 0.0
        data = self.cand.ctypes.data_as(ctypes.POINTER(self.lc.llama_token_data))
        return self.lc.llama_token_data_array(data, self.n_vocab, -1, False)

    def sample(self, ctx, row: int) -> int:
        lc = self.lc
        arr = self._candidates(ctx, row)
        lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
        tok = arr.data[arr.selected].id
        if self.grammar is not None:
            self.one[0].id, self.one[0].logit, self.one[0].p = tok, 1.0, 0.0
            single = lc.llama_token_data_array(self.one, 1, -1, False)
            lc.llama_sampler_apply(self.grammar, ctypes.byref(single))
            if self.one[0].logit == float("-inf"):  # rejected: constrain every token, then sample
                self.grammar_resamples += 1
                arr = self._candidates(ctx, row)
                lc.llama_sampler_apply(self.grammar, ctypes.byref(arr))
                lc.llama_sampler_apply(self.chain, ctypes.byref(arr))
                tok = arr.data[arr.selected].id
            lc.llama_sampler_accept(self.grammar, tok)
        lc.llama_sampler_accept(self.chain, tok)
        return tok

    def close(self) -> None:
        if self.grammar is not None:
            self.lc.llama_sampler_free(self.grammar)
            self.grammar = None
        self.lc.llama_sampler_free(self.chain)
