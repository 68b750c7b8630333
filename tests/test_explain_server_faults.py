"""The openai backend against real local HTTP servers that misbehave: hang, answer 500, close mid-answer,
answer HTML, answer 2 MB, drip the answer or its headers a byte at a time, redirect slowly, answer
JSON of the wrong shape. Each failure must be bounded in time, reported per row, never cached, and
retried by the next run; a server that stays down trips the circuit breaker so a batch ends quickly."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from dhumor.cache import StageCache
from dhumor.cli import main
from dhumor.explain import Explainer
from dhumor.explain.backends.base import GenerationRequest
from dhumor.explain.backends.openai_compat import OpenAIBackend
from dhumor.inference.explain_run import run_explain
from dhumor.inference.items import Item

import faultkit

FULL = {"summary": "A cat at the vet.", "implied_joke": "The 'small procedure' is neutering.",
        "narrative_structure": "Setup then punchline.", "emotional_effect": "Dread, then laughter.",
        "dark_attributes": "mutilation", "target": "pet owners"}


class FaultServer:
    """A chat-completions endpoint on 127.0.0.1 whose behaviour a test sets (``mode``), or scripts
    request by request (``script``: modes used in turn, then ``mode``)."""

    def __init__(self, mode: str = "ok"):
        self.mode, self.script, self.requests, self.bodies = mode, [], 0, []
        self.peers: set = set()  # client (host, port) pairs: one per TCP connection
        self.raw_answer = b""  # what mode "raw" answers with (status 200)
        self.release = threading.Event()  # set at teardown: hung handlers return
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server._lock:
                    server.requests += 1
                    server.bodies.append(body)
                    server.peers.add(self.client_address)
                    mode = server.script.pop(0) if server.script else server.mode
                getattr(self, "_" + mode)(body)

            def _send(self, code, data: bytes, ctype="application/json", length=None):
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(length if length is not None else len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _ok(self, body):
                answer = {"choices": [{"message": {"role": "assistant", "content": json.dumps(FULL)}}],
                          "usage": {"prompt_tokens": 50, "completion_tokens": 60}}
                self._send(200, json.dumps(answer).encode())

            def _hang(self, body):
                server.release.wait(60)
                self.close_connection = True

            def _error500(self, body):
                self._send(500, b'{"error": "internal error"}')

            def _refuse_schema(self, body):  # llama.cpp's server: no json_schema style
                if body.get("response_format", {}).get("type") == "json_schema":
                    self._send(400, b'{"error": "response_format json_schema not supported"}')
                else:
                    self._ok(body)

            def _refuse_grammar(self, body):  # llama-server that cannot build a grammar from a schema's maxLength
                if "maxLength" in json.dumps(body.get("response_format", {})):
                    self._send(400, b'{"error": {"code": 400, "message": "Failed to initialize samplers: '
                                    b'failed to parse grammar", "type": "invalid_request_error"}}')
                else:
                    self._ok(body)

            def _close_midway(self, body):
                self._send(200, b'{"choices": [{"mess', length=5000)  # promises more, then hangs up
                self.close_connection = True

            def _html(self, body):
                self._send(200, b"<html><body>502 Bad Gateway</body></html>", ctype="text/html")

            def _raw(self, body):
                self._send(200, server.raw_answer)

            def _critique500(self, body):  # first explanations answered, every critique fails
                if "Someone explained your meme" in json.dumps(body):
                    self._error500(body)
                else:
                    self._ok(body)

            def _retry_after_negative(self, body):
                self.send_response(429)
                self.send_header("Retry-After", "-1")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def _drip_body(self, body):  # headers at once, then a byte every 0.2 s: each read is quick
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "100000")
                self.end_headers()
                self._drip(b'{"choices": [' + b" " * 99990)

            def _drip_header_lines(self, body):  # a status line, then a header line every 0.2 s
                self._drip(b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 200, step=8)

            def _drip_headers(self, body):
                self._drip(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n" + b"X-Slow: " + b"a" * 5000)

            def _drip(self, data: bytes, step: int = 1):
                for i in range(0, len(data), step):
                    if server.release.wait(0.2):
                        break
                    try:
                        self.wfile.write(data[i:i + step])
                        self.wfile.flush()
                    except OSError:  # the client gave up: what the test wants
                        break
                self.close_connection = True

            def _slow_redirect(self, body):  # a redirect to itself, each after 0.4 s (requests follows 30)
                server.release.wait(0.4)
                self.send_response(307)
                self.send_header("Location", self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _huge(self, body):
                content = "x" * (2 * 1024 * 1024)
                self._send(200, json.dumps({"choices": [{"message": {"content": content}}]}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FaultServer()
    yield s
    s.close()


def _backend(url, **kw) -> OpenAIBackend:
    kw = {"model": "m", "base_url": url, "backoff": 0.01, "timeout": 3.0, **kw}
    return OpenAIBackend(**kw)


@contextlib.contextmanager
def _tcp_replier(reply: bytes):
    """A bare TCP server on 127.0.0.1 that reads what a client sends, answers ``reply`` and closes;
    yields its port and a list with one entry per connection accepted."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(8)
    accepted: list[int] = []

    def serve():
        while True:
            try:
                conn, _ = lsock.accept()
            except OSError:
                return
            accepted.append(1)
            conn.recv(4096)
            conn.sendall(reply)
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield lsock.getsockname()[1], accepted
    finally:
        lsock.close()


def _req() -> GenerationRequest:
    return GenerationRequest("system", "explain", json_schema={"type": "object"})


def test_a_hung_request_ends_at_its_deadline(server):
    server.mode = "hang"
    b = _backend(server.url, timeout=1.0)
    t = time.monotonic()
    g = b.generate([_req()])[0]
    took = time.monotonic() - t
    assert g.error and ("deadline" in g.error or "ReadTimeout" in g.error) and took < 2.5, (g.error, took)
    assert server.requests == 1  # the deadline covers the retries too: no second wait


@pytest.mark.parametrize("mode", ["drip_body", "drip_headers", "drip_header_lines", "slow_redirect"])
def test_a_server_that_drips_ends_at_the_deadline_too(server, mode):
    # Each socket read returns in time, so a per-read timeout never fires: only the watchdog that
    # shuts the socket at the deadline ends these (before it: 227 s for a dripped answer, 124 s for
    # slow redirects against a 10 s deadline).
    server.mode = mode
    t = time.monotonic()
    g = _backend(server.url, timeout=1.5).generate([_req()])[0]
    took = time.monotonic() - t
    assert g.error and "deadline" in g.error and took < 3.0, (g.error, took)


@pytest.mark.parametrize("answer,says", [
    ({"choices": [{"message": {"content": 42}}]}, "content is int"),
    ({"choices": [{"message": {"content": ["a"]}}]}, "content is list"),
    ({"choices": [{"message": {"content": None}}]}, "content is NoneType"),
    ({"choices": [{"message": {"content": "  "}}]}, "empty answer"),
    ({"choices": [{"message": "text"}]}, "no choices[0].message.content"),
    ({"choices": []}, "no choices[0].message.content"),
    ([1, 2], "no choices[0].message.content"),
    ("[" * 100_000 + "]" * 100_000, "not JSON"),  # nested past Python's recursion limit
])
def test_an_answer_of_the_wrong_shape_is_a_retried_row_error(server, answer, says):
    server.mode = "raw"
    server.raw_answer = (answer if isinstance(answer, str) else json.dumps(answer)).encode()
    g = _backend(server.url, max_retries=1).generate([_req()])[0]
    assert g.error and "malformed response" in g.error and says in g.error, g.error
    assert server.requests == 2  # the server's fault: tried again


@pytest.mark.parametrize("usage", ["10", None, [1, 2], {"prompt_tokens": "10", "completion_tokens": -3},
                                   {"prompt_tokens": True, "completion_tokens": 7}])
def test_odd_token_counts_do_not_break_a_good_answer(server, usage):
    server.mode = "raw"
    server.raw_answer = json.dumps({"choices": [{"message": {"content": json.dumps(FULL)}}], "usage": usage}).encode()
    g = _backend(server.url).generate([_req()])[0]
    assert g.error is None and json.loads(g.text) == FULL
    assert g.completion_tokens == (7 if isinstance(usage, dict) and usage.get("prompt_tokens") is True else 0)


def test_a_negative_retry_after_is_no_wait(server):
    server.script = ["retry_after_negative"]
    t = time.monotonic()
    g = _backend(server.url, backoff=5.0).generate([_req()])[0]
    assert g.error is None and server.requests == 2 and time.monotonic() - t < 2


@pytest.mark.parametrize("mode,says", [("error500", "HTTP 500"), ("close_midway", "ChunkedEncodingError"),
                                       ("html", "malformed response")])
def test_server_faults_are_retried_then_reported(server, mode, says):
    server.mode = mode
    g = _backend(server.url, max_retries=2).generate([_req()])[0]
    assert g.error and says in g.error and "after 2 retries" in g.error, g.error
    assert server.requests == 3


def test_a_transient_fault_is_retried_to_success(server):
    server.script = ["error500", "close_midway", "html"]
    g = _backend(server.url, max_retries=3).generate([_req()])[0]
    assert g.error is None and json.loads(g.text) == FULL and g.completion_tokens == 60
    assert server.requests == 4


def test_a_password_in_the_base_url_never_reaches_a_row(server):
    server.mode = "error500"
    host = server.url.split("//", 1)[1]
    g = _backend(f"http://user:pw-SECRET@{host}", max_retries=0).generate([_req()])[0]
    assert g.error and "HTTP 500" in g.error and "SECRET" not in g.error, g.error


def test_a_tls_handshake_cut_short_is_retried():
    """An overloaded proxy closing mid-handshake is a passing fault (unlike a plain-http server)."""
    with _tcp_replier(b"") as (port, accepted):  # a clean FIN instead of a ServerHello
        g = _backend(f"https://127.0.0.1:{port}/v1", max_retries=2).generate([_req()])[0]
        assert g.error and "SSLError" in g.error and "after 2 retries" in g.error, g.error
        assert len(accepted) == 3


def test_connections_are_kept_alive_across_batches(server):
    b = _backend(server.url, concurrency=4)
    for _ in range(3):
        assert all(g.error is None for g in b.generate([_req() for _ in range(4)]))
    assert server.requests == 12 and len(server.peers) <= 4, server.peers  # was a new connection per request


def test_a_2mb_answer_is_refused_without_retrying(server):
    server.mode = "huge"
    t = time.monotonic()
    g = _backend(server.url).generate([_req()])[0]
    assert g.error and "larger than 1000000 bytes" in g.error and server.requests == 1
    assert time.monotonic() - t < 3
    # A bigger cap takes it (the answer is then a model's problem: the parser will say so).
    g = _backend(server.url, max_response_bytes=4_000_000).generate([_req()])[0]
    assert g.error is None and len(g.text) == 2 * 1024 * 1024


def test_cache_key_does_not_follow_the_structured_output_step_down(server, tmp_path):
    server.mode = "refuse_schema"
    b = _backend(server.url, send_images=True)
    ex = Explainer(b, cache=StageCache(tmp_path / "c.sqlite"), iterations=1)
    key = ex.key("a" * 64, "cap")
    r = ex.explain(Image.new("RGB", (16, 16), "red"), "a" * 64, "cap")
    assert r.ok and b.structured == "json_object"  # stepped down mid-run
    assert ex.key("a" * 64, "cap") == key and ex.cached("a" * 64, "cap") is not None
    assert [x.get("response_format", {}).get("type") for x in server.bodies] == ["json_schema", "json_object"]


def test_a_server_that_cannot_parse_the_capped_schema_gets_a_plainer_request(server, tmp_path):
    # Prompts v2 put maxLength into the schema; a server whose grammar builder refuses it answers 400
    # naming the grammar, not response_format. The request steps down instead of failing every meme.
    server.mode = "refuse_grammar"
    b = _backend(server.url, send_images=True)
    ex = Explainer(b, cache=StageCache(tmp_path / "c.sqlite"), iterations=1)
    r = ex.explain(Image.new("RGB", (16, 16), "red"), "a" * 64, "cap")
    assert r.ok and b.structured != "json_schema"
    assert "maxLength" in json.dumps(server.bodies[0]["response_format"]) and len(server.bodies) >= 2


def _memes(tmp_path, n):
    d = tmp_path / "memes"
    d.mkdir()
    items = []
    for i in range(n):
        p = d / f"meme {i:02d}.png"
        Image.new("RGB", (24, 24), (i * 10 % 256, 50, 90)).save(p)
        items.append(Item(p.name, p, caption=f"caption {i}"))
    return items


def test_a_hung_server_trips_the_breaker_and_a_later_run_retries(server, tmp_path):
    server.mode = "hang"
    items = _memes(tmp_path, 20)
    cache, out = StageCache(tmp_path / "c.sqlite"), tmp_path / "expl.jsonl"
    b = _backend(server.url, timeout=1.0, concurrency=4, breaker_threshold=4)
    t = time.monotonic()
    s = run_explain(Explainer(b, cache=cache, iterations=2, batch_size=8), items, str(out), progress=False)
    took = time.monotonic() - t
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)  # every row accounted for, once
    assert all(r["status"] == "failed" and r["retry"] for r in rows) and s.failed == s.server_failures == 20
    down = [r for r in rows if r["error"].startswith("explanation server down: ")]
    assert len(down) >= 16 and "rerun to retry" in down[-1]["error"]
    assert server.requests <= 8 and took < 4, (server.requests, took)  # one round of timeouts, then fail fast

    # The server is back: a new run (a new backend, as a new process would have) redoes every row.
    server.mode = "ok"
    b2 = _backend(server.url, timeout=5.0)
    s2 = run_explain(Explainer(b2, cache=cache, iterations=2, batch_size=8), items, str(out), progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert s2.retried == 20 and s2.explained == 20 and s2.cached == 0
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)
    assert all(r["status"] == "ok" and not r["retry"] for r in rows)


def test_breaker_lets_one_probe_through_after_its_cooldown(server):
    server.mode = "error500"
    b = _backend(server.url, max_retries=0, breaker_threshold=2, breaker_cooldown=0.5, concurrency=1)
    gens = b.generate([_req() for _ in range(5)])
    assert server.requests == 2 and all("explanation server down" in g.error for g in gens[1:])
    server.mode = "ok"
    time.sleep(0.6)
    g1, g2 = b.generate([_req(), _req()])
    assert g1.error is None and g2.error is None and server.requests == 4  # the probe closed the breaker


def test_explain_command_exits_3_when_rows_fail(tmp_path, monkeypatch, capsys, server):
    server.mode = "error500"
    items = _memes(tmp_path, 6)
    monkeypatch.setenv("DHUMOR_OPENAI_TIMEOUT", "1")
    out = tmp_path / "expl.jsonl"
    t = time.monotonic()
    rc = main(["explain", str(items[0].path.parent), "--out", str(out), "--explain", "openai", "--explain-model", "m",
               "--base-url", server.url, "--ocr", "none", "--iterations", "1", "--quiet",
               "--cache", str(tmp_path / "c.sqlite")])
    assert rc == 3 and time.monotonic() - t < 15
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(r["status"] == "failed" and r["retry"] for r in rows)
    err = capsys.readouterr().err.strip().splitlines()
    summary = json.loads(next(line for line in err if line.startswith("{")))
    assert summary["failed"] == 6 and summary["server_failures"] == 6
    assert "6 memes were not fully explained because the server failed" in err[-1] and "rerun" in err[-1]


def _explain_cmd(items, out, server_url, *extra, cache=None):
    return ["explain", str(items[0].path.parent), "--out", str(out), "--explain", "openai", "--explain-model", "m",
            "--base-url", server_url, "--ocr", "none", "--quiet",
            "--cache", str(cache or out.parent / "c.sqlite"), *extra]


@pytest.mark.parametrize("env,arg,says", [
    ({}, "notaurl", "must start with http:// or https://"),
    ({}, "http://", "names no host"),
    ({}, "ftp://x/v1", "must start with http:// or https://"),
    ({}, "http://127.0.0.1:0/v1", "port 0"),
    ({}, "http://[::1/v1", "Invalid IPv6 URL"),
    ({"DHUMOR_OPENAI_TIMEOUT": "-5"}, None, "DHUMOR_OPENAI_TIMEOUT must be a number of seconds above 0"),
    ({"DHUMOR_OPENAI_TIMEOUT": "0"}, None, "above 0"),
    ({"DHUMOR_OPENAI_TIMEOUT": "nan"}, None, "above 0"),
    ({"DHUMOR_OPENAI_TIMEOUT": "inf"}, None, "at most 3600"),
    ({"DHUMOR_OPENAI_API_KEY": "sk-SECRET123\n"}, None, "API key contains whitespace"),
    ({"DHUMOR_OPENAI_API_KEY": "sk-€SECRET"}, None, "non-ASCII"),
    ({}, "http://127.0.0.1:8000/v1?key=SECRET", "no ?query"),
    ({}, "http://127.0.0.1:8000/v1/chat/completions", "dhumor adds /chat/completions"),
    ({}, "http://admin:Tr0ub/SECRET@127.0.0.1:99999/v1", "could not be cast"),  # urllib quotes the password
])
def test_a_bad_server_setting_is_one_line_before_anything_runs(tmp_path, monkeypatch, capsys, server, env, arg, says):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    items, out = _memes(tmp_path, 2), tmp_path / "expl.jsonl"
    t = time.monotonic()
    rc = main(_explain_cmd(items, out, arg or server.url))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and says in err and len(err.splitlines()) == 1, err
    assert "SECRET" not in err and time.monotonic() - t < 5
    assert server.requests == 0 and not out.exists()


def test_several_bad_settings_are_named_together(tmp_path, monkeypatch, capsys, server):
    monkeypatch.setenv("DHUMOR_OPENAI_TIMEOUT", "-5")
    monkeypatch.setenv("DHUMOR_OPENAI_API_KEY", "sk-SECRET\n")
    items, out = _memes(tmp_path, 1), tmp_path / "expl.jsonl"
    rc = main(_explain_cmd(items, out, "ftp://x/v1"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "SECRET" not in err, err
    for says in ("must start with http://", "DHUMOR_OPENAI_TIMEOUT must be", "API key contains whitespace"):
        assert says in err, err


def test_the_api_key_never_reaches_the_results(tmp_path, server):
    # A key the server rejects in its error text (some echo the header back) is masked in the rows.
    server.mode = "raw"
    b = _backend(server.url, api_key="sk-VERYSECRET", max_retries=0)
    server.raw_answer = b"not json, but your key sk-VERYSECRET is fine"
    g = b.generate([_req()])[0]
    assert g.error and "VERYSECRET" not in b._redact(g.error)


def test_ctrl_c_ends_a_batch_waiting_on_a_hung_server_at_once(tmp_path, server):
    server.mode = "hang"
    items, out = _memes(tmp_path, 12), tmp_path / "expl.jsonl"
    env = {**os.environ, "DHUMOR_OPENAI_TIMEOUT": "100", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dhumor.cli", *_explain_cmd(items, out, server.url)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        t0 = time.monotonic()
        while server.requests < 4 and time.monotonic() - t0 < 60:  # four requests in flight, all hung
            time.sleep(0.05)
        assert server.requests >= 4
        t = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(30)
        took = time.monotonic() - t
    finally:
        p.kill()
    assert rc == 130 and took < 5, (rc, took, p.stderr.read().decode()[-1500:])  # before: 90 s


def test_a_partial_rerun_keeps_the_rows_it_does_not_redo(tmp_path, server):
    server.mode = "error500"
    items, out = _memes(tmp_path, 10), tmp_path / "expl.jsonl"
    os.environ.pop("DHUMOR_OPENAI_TIMEOUT", None)
    assert main(_explain_cmd(items, out, server.url, "--iterations", "1")) == 3
    assert len(out.read_text().splitlines()) == 10
    server.mode = "ok"
    assert main(_explain_cmd(items, out, server.url, "--iterations", "1", "--limit", "4")) == 0  # its 4 memes are done
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)  # before: 6 rows vanished
    assert sum(r["status"] == "ok" for r in rows) == 4 and sum(bool(r["retry"]) for r in rows) == 6
    assert main(_explain_cmd(items, out, server.url, "--iterations", "1")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 10 and all(r["status"] == "ok" and not r["retry"] for r in rows)


def test_a_row_the_server_cut_short_exits_3_and_is_redone(tmp_path, server, capsys):
    server.mode = "critique500"  # iteration 1 explained, iteration 2 lost to the server
    items, out = _memes(tmp_path, 3), tmp_path / "expl.jsonl"
    assert main(_explain_cmd(items, out, server.url, "--iterations", "2")) == 3  # before: exit 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["status"] == "ok" and r["retry"] for r in rows)
    server.mode = "ok"
    assert main(_explain_cmd(items, out, server.url, "--iterations", "2")) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["iterations"]) == 2 and not r["retry"] for r in rows)


@pytest.mark.parametrize("when", ["rewrite", "append"])
def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(tmp_path, server, capsys, when):
    items = _memes(tmp_path, 20)
    try:
        with faultkit.tmpfs(tmp_path / "mnt", "256k") as mnt:  # room for the file and its rewrite, once emptied
            out = mnt / "expl.jsonl"
            cache = tmp_path / "c.sqlite"  # the cache is elsewhere: only the results file meets the full disk
            if when == "rewrite":  # a rerun must rewrite the file without the rows it redoes: 10 kept
                server.mode = "critique500"
                assert main(_explain_cmd(items, out, server.url, "--iterations", "2", cache=cache)) == 3
                server.mode = "ok"
                assert main(_explain_cmd(items, out, server.url, "--iterations", "2", "--limit", "10",
                                         cache=cache)) == 0
            faultkit.fill_up(mnt)
            before = out.read_bytes() if out.exists() else b""
            rc = main(_explain_cmd(items, out, server.url, "--iterations", "2", cache=cache))
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and "cannot write results (No space left on device)" in err[-1], err
            assert "expl.jsonl.tmp" not in {p.name for p in mnt.iterdir()}
            data = out.read_bytes()
            assert data == before  # the rewrite failed whole, or the append was cut back to the last row
            (mnt / "filler").unlink()
            assert main(_explain_cmd(items, out, server.url, "--iterations", "2", cache=cache)) == 0
            rows = [json.loads(line) for line in out.read_text().splitlines()]
            assert sorted(r["id"] for r in rows) == sorted(i.id for i in items)
    except faultkit.Unavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("argv,says", [
    (["--iterations", "0"], "--iterations: must be 1 or more, not 0"),  # before: silently ran 3
    (["--explain", "none"], "invalid choice: 'none'"),
    (["--max-tokens", "-5"], "--max-tokens: must be 1 or more"),
])
def test_explain_usage_errors_are_one_line(tmp_path, capsys, argv, says):
    with pytest.raises(SystemExit) as e:
        main(["explain", "examples", "--out", str(tmp_path / "e.jsonl"), *argv])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and says in err and len(err.splitlines()) == 1, err



class SocksDrip:
    """A real SOCKS5 proxy on 127.0.0.1 that accepts the CONNECT, then answers any request with
    headers and a body dripped a byte every 0.2 s."""

    def __init__(self):
        import socket
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"socks5://127.0.0.1:{self.sock.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(c,), daemon=True).start()

    def _handle(self, c):
        try:
            c.recv(262)
            c.sendall(b"\x05\x00")  # no authentication
            c.recv(1024)  # CONNECT
            c.sendall(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x50")
            c.recv(1 << 20)
            c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
            while not self.stop.wait(0.2):
                c.sendall(b" ")
        except OSError:
            pass
        finally:
            c.close()

    def close(self):
        self.stop.set()
        self.sock.close()


def test_the_deadline_holds_behind_a_socks_proxy(monkeypatch):
    pytest.importorskip("socks")  # PySocks: without it requests cannot use a SOCKS proxy at all
    proxy = SocksDrip()
    try:
        monkeypatch.setenv("ALL_PROXY", proxy.url)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        t = time.monotonic()
        g = _backend("http://10.255.255.1:8000/v1", timeout=1.5).generate([_req()])[0]
        took = time.monotonic() - t
    finally:
        proxy.close()
    assert g.error and "deadline" in g.error and took < 3.0, (g.error, took)


@pytest.mark.parametrize("content,rc", [('{"summary": [' * 5000, 3),  # nested past the recursion limit
                                        ("\\ud800 " + json.dumps(FULL), 0)])  # a lone surrogate
def test_odd_content_is_that_rows_problem_not_the_batchs(tmp_path, server, content, rc):
    server.mode = "raw"
    server.raw_answer = ('{"choices": [{"message": {"content": "%s"}}]}'
                         % content.replace('"', '\\"')).encode()
    items, out = _memes(tmp_path, 3), tmp_path / "expl.jsonl"
    assert main(_explain_cmd(items, out, server.url, "--iterations", "1")) == rc  # before: exit 1 / exit 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 3


def test_sigterm_ends_a_run_like_ctrl_c(tmp_path, server):
    server.mode = "hang"
    items, out = _memes(tmp_path, 12), tmp_path / "expl.jsonl"
    env = {**os.environ, "DHUMOR_OPENAI_TIMEOUT": "100", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "dhumor.cli", *_explain_cmd(items, out, server.url)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        t0 = time.monotonic()
        while server.requests < 4 and time.monotonic() - t0 < 60:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        rc = p.wait(30)
    finally:
        p.kill()
    err = p.stderr.read().decode()
    assert rc == 130 and '"interrupted": true' in err, (rc, err[-1500:])  # before: killed at once (143), no summary
    assert not (tmp_path / "expl.jsonl.lock").exists() or rc == 130


def test_https_to_a_plain_http_server_fails_at_once_and_says_why():
    """A plain-HTTP server (this one answers garbage with 400, as uvicorn and llama-server do) behind
    an https:// URL: TLS cannot work, so one attempt and a hint, not retries until the deadline."""
    with _tcp_replier(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n") as (port, accepted):
        t = time.monotonic()
        g = _backend(f"https://127.0.0.1:{port}/v1", timeout=20.0, backoff=1.0).generate([_req()])[0]
        took = time.monotonic() - t
        assert g.error and "SSLError" in g.error and "http:// rather" in g.error and "(after" not in g.error, g.error
        assert len(accepted) == 1 and took < 5, (accepted, took)
