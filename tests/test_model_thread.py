"""Every model call of the demo on one thread (dhumor/app/model_thread.py says why: PyTorch and llama.cpp
share libgomp, which stops spin-waiting once several threads own OpenMP teams)."""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from dhumor.cache import StageCache
from dhumor.app.model_thread import ModelThread

from test_explain_server_faults import FaultServer

EXAMPLE = Path(__file__).resolve().parent.parent / "dhumor" / "assets" / "examples" / "horse.jpg"


def test_calls_and_generator_steps_run_on_one_thread_in_order():
    models = ModelThread()
    seen = []

    def gen():
        for i in range(3):
            seen.append((i, threading.current_thread()))
            yield i

    assert models.call(lambda: threading.current_thread()).name.startswith("dhumor-models")
    assert list(models.iterate(gen())) == [0, 1, 2]
    threads = {t for _, t in seen}
    assert len(threads) == 1 and threads.pop().name.startswith("dhumor-models")
    # A call made from the model thread itself runs in place instead of waiting on itself forever.
    assert models.call(lambda: models.call(lambda: 7)) == 7
    models.shutdown()


def test_exceptions_come_back_and_closing_closes_the_generator_on_the_model_thread():
    models = ModelThread()
    with pytest.raises(ZeroDivisionError):
        models.call(lambda: 1 / 0)

    def failing():
        yield 1
        raise ValueError("broken meme")

    it = models.iterate(failing())
    assert next(it) == 1
    with pytest.raises(ValueError, match="broken meme"):
        next(it)

    closed_on = []

    def endless():
        try:
            while True:
                yield 0
        finally:
            closed_on.append(threading.current_thread().name)

    it = models.iterate(endless())
    next(it)
    it.close()  # a client that went away: the close is queued on the model thread
    models.call(lambda: None)  # jobs run in order: the close has run by now
    assert closed_on and closed_on[0].startswith("dhumor-models")
    models.shutdown()


def test_the_demo_runs_each_model_call_of_a_request_on_its_model_thread(tmp_path):
    """Through Gradio's own request handling (its worker threads), every compute stage of scoring a
    meme (decode and OCR, features and the model) runs on the demo's model thread, for every request;
    the wait for the explanation server does not (it would hold every other user)."""
    from gradio_client import Client, handle_file

    from dhumor.app.demo import build_demo
    from dhumor.explain import create_explainer
    from dhumor.inference.pipeline import Pipeline
    from dhumor.review.log import ReviewLog

    srv = FaultServer()
    models = ModelThread()
    try:
        cache = StageCache(tmp_path / "c.sqlite")
        pipe = models.call(lambda: Pipeline.from_checkpoint(
            cache=cache, explainer=create_explainer("openai", cache=cache, iterations=2, model="m", base_url=srv.url)))
        threads, preprocess, forward = [], pipe.preprocess, pipe.forward

        def on(fn):
            def recorded(*a, **kw):
                threads.append(threading.current_thread().name)
                return fn(*a, **kw)
            return recorded

        pipe.preprocess, pipe.forward = on(preprocess), on(forward)
        demo = build_demo(pipe, ReviewLog(tmp_path / "r.sqlite"), models=models)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
        try:
            client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            for caption in ("WHEN THE VET SAYS", "A SECOND MEME"):
                out = client.predict(handle_file(str(EXAMPLE)), caption, 0.5, api_name="/rescore")
                assert out[-1].startswith("Scored in"), out[-1]
        finally:
            demo.close()
        assert len(threads) >= 4  # two memes: a preprocess and a forward each
        assert set(threads) == {models.call(lambda: threading.current_thread().name)}
    finally:
        models.shutdown()
        srv.close()


def test_a_busy_model_thread_does_not_hold_the_process_at_exit(tmp_path):
    """Ctrl-C or SIGTERM while a meme is being explained: the process exits now, not after the step."""
    import subprocess
    import sys
    import time

    script = tmp_path / "busy.py"
    script.write_text(
        "import threading, time, sys\n"
        "from dhumor.app.model_thread import ModelThread\n"
        "m = ModelThread()\n"
        "threading.Thread(target=m.call, args=(time.sleep, 60), daemon=True).start()\n"
        "time.sleep(0.5)\n"
        "sys.exit(0)\n")
    t = time.monotonic()
    subprocess.run([sys.executable, str(script)], check=True, timeout=30)
    assert time.monotonic() - t < 10


def test_closing_a_stream_does_not_wait_behind_another_request_and_shutdown_releases_waiters():
    import time

    models = ModelThread()
    release = threading.Event()

    def steps():
        yield 1
        yield 2

    it = models.iterate(steps())
    assert next(it) == 1
    def hold():
        try:
            models.call(release.wait, 30)
        except RuntimeError:  # released by the shutdown below
            pass

    busy = threading.Thread(target=hold, daemon=True)
    busy.start()  # another request's long step now holds the model thread
    time.sleep(0.2)
    t = time.monotonic()
    it.close()  # Gradio does this on its event loop when a client goes away
    assert time.monotonic() - t < 1
    waiter_error = []

    def wait():
        try:
            models.call(lambda: None)
        except RuntimeError as e:
            waiter_error.append(str(e))

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(0.2)
    models.shutdown()  # the server stops: whoever waits is told now, not after the step
    waiter.join(5)
    assert waiter_error and "shut down" in waiter_error[0]
    with pytest.raises(RuntimeError, match="shut down"):
        models.call(lambda: None)
    release.set()


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_the_demo_stops_at_once_while_a_meme_is_being_explained(tmp_path, sig):
    """Ctrl-C or SIGTERM while the explanation server hangs: exit 130 within seconds, not after the
    request's deadline (60 s here)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import requests
    from gradio_client import Client, handle_file

    srv = FaultServer("hang")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "DHUMOR_OPENAI_TIMEOUT": "60"}
    p = subprocess.Popen([sys.executable, "-m", "dhumor.cli", "demo", "--port", str(port), "--explain", "openai",
                          "--explain-model", "m", "--base-url", srv.url, "--ocr", "none", "--quiet",
                          "--cache", str(tmp_path / "c.sqlite"), "--review-log", str(tmp_path / "r.sqlite")],
                         env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "log", "w"))
    try:
        for _ in range(600):
            try:
                requests.get(f"http://127.0.0.1:{port}/config", timeout=2)
                break
            except requests.RequestException:
                assert p.poll() is None, (tmp_path / "log").read_text()[-2000:]
                time.sleep(0.3)
        Client(f"http://127.0.0.1:{port}/", verbose=False).submit(
            handle_file(str(EXAMPLE)), "A CAPTION", 0.5, api_name="/rescore")
        for _ in range(300):
            if srv.requests:
                break
            time.sleep(0.1)
        assert srv.requests, "the explanation request never reached the server"
        t = time.monotonic()
        p.send_signal(getattr(signal, sig))
        rc = p.wait(30)
        assert rc == 130 and time.monotonic() - t < 8, (rc, time.monotonic() - t)
    finally:
        if p.poll() is None:
            p.kill()
        srv.close()
