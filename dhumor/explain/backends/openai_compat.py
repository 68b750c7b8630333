"""Any OpenAI-compatible chat-completions server: vLLM, Ollama, llama.cpp server, LM Studio, hosted APIs.

Configuration comes from arguments or the environment: ``DHUMOR_OPENAI_BASE_URL`` (or
``OPENAI_BASE_URL``), ``DHUMOR_OPENAI_MODEL``, ``DHUMOR_OPENAI_API_KEY`` (or ``OPENAI_API_KEY``).
Requests run with bounded concurrency; connection errors, timeouts, 429 and 5xx are retried with
exponential backoff (honouring ``Retry-After``).
"""
from __future__ import annotations

import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import requests

from .base import Backend, Generation, GenerationRequest, chat_messages, image_data_url

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# How servers take a JSON schema: OpenAI and vLLM ("json_schema"), llama.cpp's Python server
# ("json_object" with "schema"), or not at all. On refusal the backend steps down this list.
STRUCTURED_STYLES = ("json_schema", "json_object", "none")


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 4, concurrency: int = 4, send_images: bool = True,
                 structured_output: bool = True, image_max_side: int = 1024, backoff: float = 1.0, seed: int | None = 0):
        """
        Args:
            model: served model name (``DHUMOR_OPENAI_MODEL``).
            base_url: e.g. ``http://localhost:8000/v1`` (``DHUMOR_OPENAI_BASE_URL`` / ``OPENAI_BASE_URL``).
            api_key: bearer token (``DHUMOR_OPENAI_API_KEY`` / ``OPENAI_API_KEY``); local servers need none.
            timeout: seconds per request; max_retries: retries of a failed request; concurrency: requests in flight.
            send_images: attach the meme (needs a vision model); False sends visual cues in the text instead.
            structured_output: ask for JSON-schema output; the request style steps down (json_schema,
                json_object+schema, none) when the server refuses one.
        """
        env = os.environ.get
        self.model = model or env("DHUMOR_OPENAI_MODEL")
        self.base_url = (base_url or env("DHUMOR_OPENAI_BASE_URL") or env("OPENAI_BASE_URL") or "").rstrip("/")
        if not self.model or not self.base_url:
            raise ValueError("the openai backend needs a model and a base URL: --model/--base-url, or "
                             "DHUMOR_OPENAI_MODEL and DHUMOR_OPENAI_BASE_URL")
        self.api_key = api_key or env("DHUMOR_OPENAI_API_KEY") or env("OPENAI_API_KEY")
        self.timeout, self.max_retries, self.concurrency = timeout, max_retries, max(1, concurrency)
        self.supports_images = send_images
        self.structured = STRUCTURED_STYLES[0] if structured_output else "none"
        self.image_max_side, self.backoff, self.seed = image_max_side, backoff, seed
        self._local = threading.local()
        self._style_lock = threading.Lock()

    def fingerprint(self) -> dict:
        return {"backend": self.name, "model": self.model, "base_url": self.base_url, "images": self.supports_images,
                "structured": self.structured, "seed": self.seed}

    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            if self.api_key:
                s.headers["Authorization"] = f"Bearer {self.api_key}"
        return s

    def payload(self, req: GenerationRequest) -> dict:
        part = None
        if self.supports_images and req.image is not None:
            part = {"type": "image_url", "image_url": {"url": image_data_url(req.image, self.image_max_side)}}
        body = {"model": self.model, "messages": chat_messages(req, self.supports_images, part),
                "max_tokens": req.max_tokens, "temperature": req.temperature}
        if self.seed is not None:
            body["seed"] = self.seed
        if self.structured == "json_schema" and req.json_schema:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "answer", "schema": req.json_schema, "strict": False}}
        elif self.structured == "json_object" and req.json_schema:
            body["response_format"] = {"type": "json_object", "schema": req.json_schema}
        return body

    def _one(self, req: GenerationRequest) -> Generation:
        t0 = time.perf_counter()
        url = f"{self.base_url}/chat/completions"
        last, retries = "", 0
        while True:
            body = self.payload(req)
            wait = None
            try:
                r = self._session().post(url, json=body, timeout=self.timeout)
            except requests.RequestException as e:
                last = f"{type(e).__name__}: {e}"
            else:
                if r.status_code == 200:
                    try:
                        data = r.json()
                        text = data["choices"][0]["message"].get("content") or ""
                    except (ValueError, KeyError, IndexError) as e:
                        return Generation("", seconds=time.perf_counter() - t0,
                                          error=f"malformed response from {url}: {e}")
                    usage = data.get("usage") or {}
                    return Generation(text, usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0),
                                      time.perf_counter() - t0)
                last = f"HTTP {r.status_code}: {r.text[:300]}"
                if "response_format" in body and "response_format" in r.text and r.status_code in (400, 422, 500):
                    self._step_down(body["response_format"]["type"])  # not a retry: a different request
                    continue
                if r.status_code not in RETRY_STATUS:
                    break
                wait = _retry_after(r)
            if retries >= self.max_retries:
                break
            time.sleep(wait if wait is not None else self.backoff * (2 ** retries) * (0.5 + random.random()))
            retries += 1
        return Generation("", seconds=time.perf_counter() - t0, error=f"{url}: {last}")

    def _step_down(self, refused: str) -> None:
        """This server wants another structured-output style (or none: the parser copes)."""
        with self._style_lock:
            if self.structured == refused:
                self.structured = STRUCTURED_STYLES[STRUCTURED_STYLES.index(refused) + 1]

    def generate(self, requests_: list[GenerationRequest]) -> list[Generation]:
        if len(requests_) == 1 or self.concurrency == 1:
            return [self._one(r) for r in requests_]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self._one, requests_))


def _retry_after(r: requests.Response) -> float | None:
    v = r.headers.get("Retry-After")
    try:
        return min(60.0, float(v)) if v else None
    except ValueError:
        return None
