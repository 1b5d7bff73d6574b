"""`spamfilterd serve` as a real process: readiness via sd_notify, SIGHUP reloads, SIGTERM drains.

These start a subprocess that imports torch (a few seconds), so the whole life cycle — start,
reload with a broken config, reload with a good one, stop in the middle of a transfer — runs in
one daemon.
"""

from __future__ import annotations

import asyncio
import os
import signal
import smtplib
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from spamfilterd.config import load_config
from spamfilterd.http import Metrics
from spamfilterd.serve import Daemon, build_runtime
from tests.helpers import (
    HAM,
    SPAM,
    START_TIMEOUT,
    LoopThread,
    Notifications,
    Sink,
    free_port,
    make_message,
    split,
)


@pytest.fixture
def daemon_env(tmp_path):
    lt = LoopThread()
    sink = Sink(lt).start()
    notify = Notifications(tmp_path / "notify")
    yield sink, notify
    notify.sock.close()
    sink.stop()
    lt.close()


def write_config(path: Path, checkpoint: Path, sink_port: int, smtp_port: int, http_port: int, thresholds):
    data = {
        "model": {"checkpoint": str(checkpoint), "device": "cpu", "threads": 1},
        "thresholds": thresholds,
        "smtp": {"listen": f"127.0.0.1:{smtp_port}", "downstream": f"127.0.0.1:{sink_port}"},
        "http": {"listen": f"127.0.0.1:{http_port}"},
    }
    path.write_text(yaml.safe_dump(data))


def spamfilterd(*args: str, env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", "from spamfilterd.cli import main; main()", *args]
    stderr = log.open("wb") if log else subprocess.PIPE
    return subprocess.Popen(
        command, env={**os.environ, **(env or {})}, stderr=stderr, stdout=subprocess.DEVNULL
    )


def refused(port: int) -> bool:
    """No new sessions while draining: the socket is closed (or, in a race, a 421 greeting)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            return sock.recv(3) in (b"421", b"")
    except OSError:
        return True


def send(port: int, tag: str) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as conn:
        assert conn.sendmail("alice@example.org", ["bob@example.net"], make_message(tag)) == {}


def get(url: str) -> str:
    return urllib.request.urlopen(url, timeout=10).read().decode()


def test_serve_signals_readiness_reloads_safely_and_drains_on_sigterm(tiny_checkpoint, tmp_path, daemon_env):
    sink, notify = daemon_env
    smtp_port, http_port = free_port(), free_port()
    config, log = tmp_path / "config.yaml", tmp_path / "daemon.log"
    write_config(config, tiny_checkpoint, sink.port, smtp_port, http_port, HAM)
    proc = spamfilterd("serve", "--config", str(config), env={"NOTIFY_SOCKET": str(notify.path)}, log=log)
    try:
        notify.wait_for("READY=1", START_TIMEOUT)
        send(smtp_port, "first")
        assert b"X-Spam-Flag: NO" in sink.received[-1].content
        assert get(f"http://127.0.0.1:{http_port}/healthz") == "ok\n"
        assert get(f"http://127.0.0.1:{http_port}/readyz") == "ready\n"

        config.write_text("smtp: [this is not: valid yaml\n")
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", 30)  # RELOADING=1 first, READY=1 once the attempt is over
        assert any("RELOADING=1" in m for m in notify.seen)
        send(smtp_port, "after-broken-reload")
        assert len(sink.received) == 2
        metrics = get(f"http://127.0.0.1:{http_port}/metrics")
        assert 'spamfilterd_reloads_total{result="failed"} 1' in metrics
        assert 'spamfilterd_messages_total{verdict="ham",action="delivered"} 2' in metrics

        write_config(config, tiny_checkpoint, sink.port, smtp_port, http_port, SPAM)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", 60)
        send(smtp_port, "after-good-reload")
        assert b"X-Spam-Flag: YES" in sink.received[-1].content

        # SIGTERM while a client is in the middle of DATA: the message is finished and delivered.
        message = make_message("in-flight")
        conn = smtplib.SMTP("127.0.0.1", smtp_port, timeout=30)
        conn.ehlo()
        assert conn.mail("alice@example.org")[0] == 250
        assert conn.rcpt("bob@example.net")[0] == 250
        conn.putcmd("data")
        assert conn.getreply()[0] == 354
        stuffed = message.replace(b"\r\n.", b"\r\n..")
        conn.send(stuffed[:200])
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING=1", 10)
        assert refused(smtp_port)
        conn.send(stuffed[200:] + b".\r\n")
        code, _ = conn.getreply()
        assert code == 250
        assert split(sink.received[-1].content)[1] == split(message)[1]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "reload failed, still serving the previous config and model" in text
    assert "message_id=<in-flight@test.example>" in text
    assert "Köln" not in text  # no message content in the log


def test_serve_exits_78_on_an_invalid_config(tiny_checkpoint, tmp_path):
    """The one bad key is named, with the file: the checkpoint is fine, so nothing else can be blamed."""
    config = tmp_path / "config.yaml"
    config.write_text(f"model:\n  checkpoint: {tiny_checkpoint}\nsmtp:\n  max_sessions: many\n")
    proc = spamfilterd("serve", "--config", str(config))
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 78
    assert stderr.decode().splitlines() == [
        f"spamfilterd: error: {config}: smtp.max_sessions: expected an integer, got str 'many'"
    ]


def test_reload_refuses_a_model_that_does_not_load_and_keeps_the_old_one(
    tiny_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setattr("spamfilterd.serve.setup_logging", lambda config: None)
    config = tmp_path / "config.yaml"
    write_config(config, tiny_checkpoint, 10026, 10025, 9025, HAM)
    metrics = Metrics()
    runtime = build_runtime(load_config(config), metrics)
    daemon = Daemon(config, None, runtime, metrics)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.json").write_bytes((tiny_checkpoint / "model.json").read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    write_config(config, broken, 10026, 10025, 9025, HAM)
    assert asyncio.run(daemon.reload()) is False
    assert daemon.proxy.runtime is runtime
    assert metrics.reloads["failed"] == 1

    write_config(config, tiny_checkpoint, 10026, 10025, 9025, SPAM)
    assert asyncio.run(daemon.reload()) is True
    assert daemon.proxy.runtime is not runtime
    assert daemon.proxy.runtime.engine.thresholds.spam == 0.0
    assert metrics.reloads["ok"] == 1


def test_a_redirect_address_downstream_refuses_stops_start_and_reload(
    tiny_checkpoint, tmp_path, monkeypatch, daemon_env
):
    sink, _ = daemon_env
    monkeypatch.setattr("spamfilterd.serve.setup_logging", lambda config: None)
    config = tmp_path / "config.yaml"
    write_config(config, tiny_checkpoint, sink.port, free_port(), free_port(), HAM)
    metrics = Metrics()
    runtime = build_runtime(load_config(config), metrics)
    daemon = Daemon(config, None, runtime, metrics)

    data = yaml.safe_load(config.read_text())
    data["rules"] = [{"match": {"verdict": "spam"}, "actions": [{"redirect": "spam@example.net"}]}]
    config.write_text(yaml.safe_dump(data))
    sink.handler.rcpt_replies["spam@example.net"] = "550 5.1.1 <spam@example.net>: Recipient address rejected"
    assert asyncio.run(daemon.reload()) is False  # the old config keeps serving
    assert daemon.proxy.runtime is runtime

    refusing = Daemon(config, None, build_runtime(load_config(config), metrics), metrics)
    assert asyncio.run(refusing.run()) == 78  # EX_CONFIG: a restart cannot fix it, the admin can


def spamd_check(socket_path: Path, message: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(socket_path))
        sock.sendall(b"CHECK SPAMC/1.5\r\nContent-length: %d\r\n\r\n" % len(message) + message)
        sock.shutdown(socket.SHUT_WR)
        return b"".join(iter(lambda: sock.recv(4096), b""))


def test_serve_with_only_the_spamd_door_reloads_and_removes_its_socket(tiny_checkpoint, tmp_path):
    """smtp.listen: null — an Exim or pipe-only host; the socket's directory is created."""
    notify = Notifications(tmp_path / "notify")
    socket_path = tmp_path / "run" / "spamd.sock"
    config, log = tmp_path / "config.yaml", tmp_path / "daemon.log"
    http_port, nobody = free_port(), free_port()

    def configure(thresholds):
        data = {
            "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "threads": 1},
            "thresholds": thresholds,
            "smtp": {"listen": None, "downstream": f"127.0.0.1:{nobody}"},  # no MTA: none needed
            "spamd": {"listen": [f"unix:{socket_path}"]},
            "http": {"listen": f"127.0.0.1:{http_port}"},
        }
        config.write_text(yaml.safe_dump(data))

    configure(SPAM)
    proc = spamfilterd("serve", "--config", str(config), env={"NOTIFY_SOCKET": str(notify.path)}, log=log)
    try:
        ready = notify.wait_for("READY=1", START_TIMEOUT)
        assert f"STATUS=serving spamd protocol on unix:{socket_path}" in ready
        assert get(f"http://127.0.0.1:{http_port}/readyz") == "ready\n"
        assert b"\r\nSpam: True ; " in spamd_check(socket_path, make_message("spamd-1"))
        configure(HAM)
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("READY=1", 60)
        assert b"\r\nSpam: False ; " in spamd_check(socket_path, make_message("spamd-2"))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()
    assert not socket_path.exists()
    assert "door=spamd request=CHECK message_id=<spamd-2@test.example>" in log.read_text()
