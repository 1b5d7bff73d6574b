"""The proxy with a model that hangs or fails: GTUBE, the `unchecked` fallback, readiness, SIGTERM.

A real proxy relays to a real sink on 127.0.0.1; only the model is replaced, by one that can be
told to hang or to raise, which is the fault under test. The last test runs the real daemon.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import yaml

from spamfilterd.config import load_config
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.http import HealthServer, Metrics
from spamfilterd.scores import Thresholds
from spamfilterd.serve import build_runtime, smtp_proxy
from spamfilterd.smtp_server import SmtpProxy
from tests.helpers import BODY, START_TIMEOUT, LoopThread, Notifications, Sink, free_port, make_message, split


class FaultyModel:
    """Stands in for SpamClassifier: scores 0.1 (ham), or hangs, or raises, as the test says."""

    model_id = "faulty-test"
    thresholds = Thresholds(spam=0.5, unsure=0.3)

    def __init__(self) -> None:
        self.mode = "ok"  # ok | hang | fail
        self.hanging = threading.Event()  # set once a call hangs
        self.release = threading.Event()  # set to let hanging calls return

    def score(self, texts: list[str]) -> list[float]:
        if self.mode == "hang":
            self.hanging.set()
            self.release.wait()
        if self.mode == "fail":
            raise RuntimeError("model exploded")
        return [0.1] * len(texts)


@dataclass
class Rig:
    lt: LoopThread
    sink: Sink
    model: FaultyModel
    proxy: SmtpProxy
    port: int

    def send(self, message: bytes) -> dict:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as conn:
            return conn.sendmail("alice@example.org", ["bob@example.net"], message)


@pytest.fixture
def rig(tmp_path, tiny_checkpoint, request):
    """`@pytest.mark.parametrize('rig', [{smtp options}], indirect=True)` sets smtp: keys."""
    lt = LoopThread()
    sink = Sink(lt).start()
    model = FaultyModel()
    smtp = {"downstream": f"127.0.0.1:{sink.port}", "downstream_timeout": 5, **getattr(request, "param", {})}
    data = {"model": {"checkpoint": str(tiny_checkpoint)}, "smtp": smtp}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(data))
    config = load_config(tmp_path / "config.yaml")
    metrics = Metrics()
    runtime = build_runtime(config, metrics, FilterEngine(config, model))
    proxy = smtp_proxy(runtime, metrics, hostname="proxy.test")
    _, port = lt.run(proxy.start("127.0.0.1", 0))
    yield Rig(lt, sink, model, proxy, port)
    model.release.set()
    lt.run(proxy.shutdown(grace=2))
    proxy.runtime.batcher.close()
    sink.stop()
    lt.close()


@pytest.mark.parametrize("rig", [{"classify_timeout": 1, "data_timeout": 20}], indirect=True)
def test_gtube_is_decided_before_the_model_so_a_hung_model_cannot_pass_it_unchecked(rig):
    rig.model.mode = "hang"
    first = threading.Thread(target=rig.send, args=(make_message("stuck"),))
    first.start()
    assert rig.model.hanging.wait(10)  # the only model worker is now busy for good
    assert rig.send(make_message("gtube", body=b"test\r\n" + GTUBE + b"\r\n")) == {}
    first.join(30)
    heads = {b"<gtube@" in r.content: split(r.content)[0] for r in rig.sink.received}
    assert b"X-Spam-Flag: YES\r\n" in heads[True]
    assert b" tests=GTUBE\r\n" in heads[True] and b"unchecked" not in heads[True]
    assert b"X-Spam-Status: unchecked\r\n" in heads[False]


def test_a_failure_while_checking_a_gtube_message_is_a_classifier_error_not_a_500(rig):
    engine = rig.proxy.runtime.engine

    def broken(raws, envelopes):
        raise RuntimeError("engine bug")

    engine.check_many = broken
    assert rig.send(make_message("gtube-broken", body=GTUBE + b"\r\n")) == {}
    (got,) = rig.sink.received
    assert b"X-Spam-Status: unchecked\r\n" in split(got.content)[0]


@pytest.mark.parametrize("rig", [{"classify_timeout": 1, "data_timeout": 20}], indirect=True)
def test_a_message_whose_model_call_times_out_across_a_reload_still_goes_out_unchecked(rig):
    rig.model.mode = "hang"
    sending = threading.Thread(target=rig.send, args=(make_message("across-reload"),))
    sending.start()
    assert rig.model.hanging.wait(10)
    old = rig.proxy.swap(rig.proxy.runtime)  # what a SIGHUP does: swap, then close the old batcher
    old.batcher.close()
    sending.join(30)
    (got,) = rig.sink.received
    assert b"X-Spam-Status: unchecked\r\n" in split(got.content)[0]


@pytest.mark.parametrize("rig", [{"classify_timeout": 1, "data_timeout": 5}], indirect=True)
def test_unchecked_fallback_does_not_queue_on_the_shared_default_executor(rig):
    """The fallback rewrite ran on asyncio's default executor: when that was saturated, the
    message missed its deadline and got 451 instead of going out `unchecked`."""
    rig.model.mode = "fail"
    blocker = threading.Event()

    async def saturate() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        loop.run_in_executor(None, blocker.wait)

    rig.lt.run(saturate())
    try:
        assert rig.send(make_message("fallback")) == {}
    finally:
        blocker.set()
    (got,) = rig.sink.received
    head, body = split(got.content)
    assert b"X-Spam-Status: unchecked\r\n" in head and body == BODY


def _readyz(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("rig", [{"classify_timeout": 1}], indirect=True)
def test_readyz_is_ready_only_while_downstream_answers_and_the_model_classifies(rig):
    from spamfilterd.readiness import not_ready_reason

    health = HealthServer(rig.proxy.metrics, readiness=lambda: not_ready_reason(rig.proxy))
    host, port = rig.lt.run(health.start("127.0.0.1", 0))
    url = f"http://{host}:{port}/readyz"
    rig.proxy.metrics.ready = True
    try:
        assert _readyz(url) == (200, "ready\n")

        rig.sink.stop()
        status, text = _readyz(url)
        assert status == 503
        assert text.startswith(f"not ready: downstream 127.0.0.1:{rig.sink.port} unavailable")
        rig.sink.start()
        assert _readyz(url) == (200, "ready\n")

        rig.model.mode = "fail"
        assert rig.send(make_message("unchecked")) == {}  # went out unchecked
        status, text = _readyz(url)
        assert status == 503 and "the model does not answer" in text
        rig.model.mode = "ok"
        assert _readyz(url) == (200, "ready\n")  # a probe found the model answering again
    finally:
        rig.lt.run(health.close())


HANGING_DAEMON = """
import threading
from spamfilterd.classifier import SpamClassifier
score = SpamClassifier.score
def hang_on_request(self, texts):
    if any("hang-the-model" in text for text in texts):
        threading.Event().wait()  # a model call that never returns
    return score(self, texts)
SpamClassifier.score = hang_on_request
from spamfilterd.cli import main
main()
"""


def test_sigterm_exits_within_data_timeout_plus_10_s_while_a_worker_is_stuck(tiny_checkpoint, tmp_path):
    lt = LoopThread()
    sink = Sink(lt).start()
    notify = Notifications(tmp_path / "notify")
    smtp_port, data_timeout = free_port(), 2
    config = tmp_path / "config.yaml"
    data = {
        "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "threads": 1},
        "smtp": {
            "listen": f"127.0.0.1:{smtp_port}",
            "downstream": f"127.0.0.1:{sink.port}",
            "classify_timeout": 1,
            "data_timeout": data_timeout,
        },
    }
    config.write_text(yaml.safe_dump(data))
    log = (tmp_path / "daemon.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", HANGING_DAEMON, "serve", "--config", str(config)],
        env={**os.environ, "NOTIFY_SOCKET": str(notify.path)},
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    try:
        notify.wait_for("READY=1", START_TIMEOUT)
        body = BODY + b"hang-the-model\r\n"
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=30) as conn:
            assert conn.sendmail("alice@example.org", ["bob@example.net"], make_message("h", body)) == {}
        assert b"X-Spam-Status: unchecked" in sink.received[-1].content  # a worker is now stuck
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(data_timeout + 10) == 0  # the README's promise; it used to hang for good
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        notify.sock.close()
        sink.stop()
        lt.close()
