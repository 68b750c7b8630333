"""Any OpenAI-compatible chat-completions server: vLLM, Ollama, llama.cpp server, LM Studio, hosted APIs.

Configuration comes from arguments or the environment: ``DHUMOR_OPENAI_BASE_URL`` (or
``OPENAI_BASE_URL``), ``DHUMOR_OPENAI_MODEL``, ``DHUMOR_OPENAI_API_KEY`` (or ``OPENAI_API_KEY``),
``DHUMOR_OPENAI_TIMEOUT`` (seconds).

Failure is bounded: each request has a deadline (``timeout``, 60 s by default) that covers every
retry of it, so a hung server costs about a minute per request, not minutes. The deadline holds
whatever the server does: a watchdog shuts the request's socket when it passes, so an answer
dripped a byte at a time, slow headers or a chain of slow redirects end there too; at most
``MAX_REDIRECTS`` redirects are followed per request (a redirect loop is not retried). Connection errors,
timeouts, truncated or non-JSON answers, 429 and 5xx are retried with exponential backoff inside
that deadline (honouring ``Retry-After``). After ``breaker_threshold`` consecutive failed requests a
circuit breaker takes the server as down and every further request fails at once with
"explanation server down: ..."; such failures are never cached, so a later run retries them.
"""
from __future__ import annotations

import contextlib
import json
import queue
import random
import threading
import time

from urllib.parse import urlsplit

import requests

from dhumor.explain.backends import openai_settings
from dhumor.explain.backends.base import Backend, Generation, GenerationRequest, chat_messages, image_data_url
from dhumor.explain.backends.circuit import CircuitBreaker
from dhumor.explain.backends.deadline import DeadlineWatchdog, deadline_session

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
# Request errors that no retry can fix: the URL or a header (the API key) is malformed.
# Settings, not passing faults: trying again cannot help (a TLS failure is a certificate or an
# https:// URL for a plain-http server).
NOT_RETRIED = (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema, requests.exceptions.InvalidSchema,
               requests.exceptions.InvalidHeader, requests.exceptions.TooManyRedirects)
# Redirects followed per request (requests' default is 30): a loop ends after this many hops, is not
# retried, and every hop counts against the request's deadline (the watchdog watches each connection).
MAX_REDIRECTS = 5
# TLS failures that are settings (a plain-http server behind https://, a certificate that does not
# verify): not retried. Others (a handshake cut short by an overloaded proxy) are passing faults.
TLS_SETTINGS = ("WRONG_VERSION_NUMBER", "CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "hostname mismatch")
# How servers take a JSON schema: OpenAI and vLLM ("json_schema"), llama.cpp's Python server
# ("json_object" with "schema"), or not at all. On refusal the backend steps down this list.
STRUCTURED_STYLES = ("json_schema", "json_object", "none")
SERVER_DOWN = "explanation server down"


class _Failed(Exception):
    """One attempt failed; ``retry`` says whether another attempt may help."""

    def __init__(self, message: str, retry: bool = True, wait: float | None = None, counts: bool = True):
        super().__init__(message)
        self.retry, self.wait, self.counts = retry, wait, counts  # counts: uses up one of max_retries


class OpenAIBackend(Backend):
    name = "openai"

    def __init__(self, model: str | None = None, base_url: str | None = None, api_key: str | None = None,
                 timeout: float | None = None, max_retries: int = 3, concurrency: int = 4, send_images: bool = True,
                 structured_output: bool = True, image_max_side: int = 1024, backoff: float = 1.0, seed: int | None = 0,
                 connect_timeout: float = 10.0, breaker_threshold: int = 4, breaker_cooldown: float = 300.0,
                 max_response_bytes: int = 1_000_000):
        """
        Args:
            model: served model name (``DHUMOR_OPENAI_MODEL``).
            base_url: e.g. ``http://localhost:8000/v1`` (``DHUMOR_OPENAI_BASE_URL`` / ``OPENAI_BASE_URL``).
            api_key: bearer token (``DHUMOR_OPENAI_API_KEY`` / ``OPENAI_API_KEY``); local servers need none.
            timeout: deadline in seconds for one request, all its retries included (``DHUMOR_OPENAI_TIMEOUT``,
                default 60); raise it for slow servers that need longer to generate.
            max_retries: retries of a failed request (within the deadline); backoff: first retry's wait (doubles).
            concurrency: requests in flight.
            send_images: attach the meme (needs a vision model); False sends visual cues in the text instead.
            structured_output: ask for JSON-schema output; the request style steps down (json_schema,
                json_object+schema, none) when the server refuses one.
            breaker_threshold: consecutive failed requests after which the server is taken as down;
                breaker_cooldown: seconds before one probe request tries it again.
            max_response_bytes: a larger answer is an error (a chat answer is a few kB).
        """
        self.model = openai_settings.model(model)
        self.base_url = openai_settings.base_url(base_url)
        self._url_password = urlsplit(self.base_url).password
        self.api_key = openai_settings.api_key(api_key)
        timeout = openai_settings.timeout(timeout)
        self.timeout, self.connect_timeout, self.max_retries = timeout, connect_timeout, max_retries
        self.concurrency = max(1, concurrency)
        self.supports_images = send_images
        self.structured_output = structured_output
        self.structured = STRUCTURED_STYLES[0] if structured_output else "none"
        self.image_max_side, self.backoff, self.seed = image_max_side, backoff, seed
        self.max_response_bytes = max_response_bytes
        self.breaker = CircuitBreaker(breaker_threshold, breaker_cooldown)
        # Idle sessions, each with its kept-alive connections: a request borrows one, so the worker
        # threads of later generate() calls reuse connections instead of opening new ones.
        self._sessions: queue.SimpleQueue[requests.Session] = queue.SimpleQueue()
        self._style_lock = threading.Lock()
        self._watchdog = DeadlineWatchdog()

    def fingerprint(self) -> dict:
        # Only configured settings: the structured-output style found at run time (self.structured)
        # changes how a request is sent, not what the run is, and would split one run's cache keys.
        return {"backend": self.name, "model": self.model, "base_url": self.base_url, "images": self.supports_images,
                "structured_output": self.structured_output, "seed": self.seed}

    @contextlib.contextmanager
    def _session(self):
        """A session for one request, used by no other thread meanwhile (requests.Session is not
        thread-safe), then returned to the idle ones."""
        try:
            s = self._sessions.get_nowait()
        except queue.Empty:
            s = deadline_session()
            s.max_redirects = MAX_REDIRECTS
            if self.api_key:
                s.headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            yield s
        finally:
            self._sessions.put(s)

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
        if req.stop:
            body["stop"] = list(req.stop)
        return body

    def _attempt(self, url: str, body: dict, deadline: float) -> Generation:
        """One HTTP attempt, bounded by ``deadline`` (time.monotonic) and ``max_response_bytes``."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Failed(f"no answer within the {self.timeout:g} s deadline", retry=False)
        late = _Failed(f"no complete answer within the {self.timeout:g} s deadline", retry=False)
        try:
            with self._session() as session, self._watchdog.watch(deadline) as watch, \
                    session.post(url, json=body, stream=True, timeout=(min(self.connect_timeout, left), left)) as r:
                raw = bytearray()
                for chunk in r.iter_content(16384):
                    raw += chunk
                    if len(raw) > self.max_response_bytes:
                        raise _Failed(f"answer larger than {self.max_response_bytes} bytes", retry=False)
                    if time.monotonic() > deadline:
                        raise late
            if watch.expired:  # the watchdog shut the socket and the read took that as the end
                raise late
        except requests.RequestException as e:
            if watch.expired:  # the watchdog shut the socket: the deadline, not the network, ended it
                raise late from None
            hint, setting = "", isinstance(e, NOT_RETRIED)
            if isinstance(e, requests.exceptions.SSLError):
                setting = any(m in str(e) for m in TLS_SETTINGS)
                if "WRONG_VERSION_NUMBER" in str(e):
                    hint = " (the server does not speak TLS here: is its base URL http:// rather than https://?)"
            raise _Failed(self._redact(f"{type(e).__name__}: {str(e)[:300]}") + hint, retry=not setting) from None
        text = raw.decode("utf-8", "replace")
        if r.status_code != 200:
            # "grammar": llama-server names the grammar it could not build from the schema, not the field
            if "response_format" in body and ("response_format" in text or "grammar" in text.lower()) \
                    and r.status_code in (400, 422, 500):
                self._step_down(body["response_format"]["type"])
                raise _Failed(f"HTTP {r.status_code}: refused {body['response_format']['type']}", wait=0.0,
                              counts=False)  # not a retry: the next request is a different one
            raise _Failed(f"HTTP {r.status_code}: {text[:300]}", retry=r.status_code in RETRY_STATUS,
                          wait=_retry_after(r))
        # A proxy's HTML page, a truncated body or an answer of another shape: the server's fault,
        # worth another try (an empty answer too: a model that is up says something).
        return _read_answer(text)

    def _redact(self, text: str) -> str:
        """Never let the API key, or a password in the base URL, reach a results file or a log."""
        for secret in (self.api_key, self._url_password):
            if secret:
                text = text.replace(secret, "***")
        return text

    def _one(self, req: GenerationRequest, cancel: threading.Event | None = None) -> Generation:
        t0 = time.monotonic()
        cancel = cancel or threading.Event()  # the caller's own thread: Ctrl-C interrupts the wait itself
        url = f"{self.base_url}/chat/completions"
        refused = self.breaker.refusal()
        if refused:
            return Generation("", error=self._redact(f"{SERVER_DOWN}: {self.base_url}: {refused}; rerun to retry"))
        deadline = t0 + self.timeout
        retries, last = 0, ""
        while True:
            try:
                g = self._attempt(url, self.payload(req), deadline)
                g.seconds = time.monotonic() - t0
                self.breaker.record(None)
                return g
            except _Failed as f:
                last = str(f)
                if not f.retry or (f.counts and retries >= self.max_retries):
                    break
                wait = f.wait if f.wait is not None else self.backoff * (2 ** retries) * (0.5 + random.random())
                if time.monotonic() + wait >= deadline:
                    break
                if cancel.wait(wait):  # interrupted: no more attempts
                    return Generation("", seconds=time.monotonic() - t0, error="interrupted")
                retries += f.counts
        self.breaker.record(last)
        err = self._redact(f"{url}: {last}") + (f" (after {retries} retries)" if retries else "")
        if self.breaker.is_open:
            err = f"{SERVER_DOWN}: {err}; rerun to retry"
        return Generation("", seconds=time.monotonic() - t0, error=err)

    def _step_down(self, refused: str) -> None:
        """This server wants another structured-output style (or none: the parser copes)."""
        with self._style_lock:
            if self.structured == refused:
                self.structured = STRUCTURED_STYLES[STRUCTURED_STYLES.index(refused) + 1]

    def generate(self, requests_: list[GenerationRequest]) -> list[Generation]:
        if len(requests_) == 1 or self.concurrency == 1:
            return [self._one(r) for r in requests_]  # Ctrl-C interrupts this thread's socket read itself
        # Daemon threads rather than a ThreadPoolExecutor: the interpreter joins an executor's workers
        # at exit, so a Ctrl-C would wait for every request still connecting or stuck in a read.
        cancel = threading.Event()
        todo: queue.SimpleQueue[int] = queue.SimpleQueue()
        for i in range(len(requests_)):
            todo.put(i)
        out: list[Generation | None] = [None] * len(requests_)
        crashed: list[BaseException] = []

        def work() -> None:
            while not cancel.is_set():
                try:
                    i = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    out[i] = self._one(requests_[i], cancel)
                except BaseException as e:  # a bug: re-raised in the caller's thread below
                    crashed.append(e)
                    cancel.set()

        threads = [threading.Thread(target=work, name="dhumor-openai", daemon=True)
                   for _ in range(min(self.concurrency, len(requests_)))]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:
            # Ctrl-C reaches only this thread: end the workers' requests now.
            cancel.set()
            self._watchdog.expire_all()
            raise
        if crashed:
            raise crashed[0]
        return out  # type: ignore[return-value]


def _read_answer(text: str) -> Generation:
    """The answer's text and token counts, or a retried failure naming what is wrong with it."""
    def bad(why: str) -> _Failed:
        return _Failed(f"malformed response ({why}): {text[:120]!r}")

    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: a deeply nested answer
        raise bad(f"not JSON: {type(e).__name__}") from None
    try:
        content = data["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise bad(f"no choices[0].message.content: {type(e).__name__}: {str(e)[:60]}") from None
    if not isinstance(content, str):
        raise bad(f"content is {type(content).__name__}, not text")
    # A lone surrogate ("\\ud800" in the JSON) is not text any file or cache can hold: make it visible.
    content = content.encode("utf-8", "replace").decode("utf-8")
    if not content.strip():
        raise bad("empty answer")
    usage = data.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    return Generation(content, _count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))


def _count(v) -> int:
    """A token count as the server reported it; anything but a whole number counts as 0 (unknown)."""
    return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0


def _retry_after(r: requests.Response) -> float | None:
    """The server's ``Retry-After`` in seconds, within 0-60 (an HTTP date or junk: None, plain backoff)."""
    v = r.headers.get("Retry-After")
    try:
        wait = float(v) if v else None
    except ValueError:
        return None
    return None if wait is None or wait != wait else min(60.0, max(0.0, wait))
