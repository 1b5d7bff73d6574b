"""The SMTP/LMTP proxy end to end on loopback: smtplib clients, the proxy, a real aiosmtpd sink.

The proxy and the sink share one event loop in a background thread (as in the daemon); the
clients are ordinary blocking smtplib calls from the test thread or from worker threads. The
classifier is a real tiny random checkpoint; verdicts are forced with config thresholds.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from spamfilterd.batcher import Runtime
from spamfilterd.config import load_config
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.http import HealthServer, Metrics
from spamfilterd.logformat import LogfmtFormatter, logfmt
from spamfilterd.serve import build_runtime, smtp_proxy
from spamfilterd.smtp import OTHER_POLICY
from spamfilterd.smtp_server import QuarantineError, SmtpProxy
from tests.helpers import (
    BODY,
    HAM,
    SPAM,
    LoopThread,
    Sink,
    count_header_reads,
    make_message,
    reads_of,
    split,
)


@dataclass
class Harness:
    """One proxy with its sink; `reconfigure` swaps in a new config as a SIGHUP would."""

    lt: LoopThread
    sink: Sink
    proxy: SmtpProxy
    port: int
    make_runtime: object

    def client(self, lmtp: bool = False) -> smtplib.SMTP:
        return (smtplib.LMTP if lmtp else smtplib.SMTP)("127.0.0.1", self.port, timeout=30)

    def send(self, message: bytes, rcpts=("bob@example.net",), sender="alice@example.org", **kw):
        with self.client() as conn:
            return conn.sendmail(sender, list(rcpts), message, mail_options=["BODY=8BITMIME"], **kw)

    def reconfigure(self, **config) -> None:
        self.proxy.swap(self.make_runtime(**config))


@pytest.fixture
def harness(lt, classifier, tiny_checkpoint, tmp_path, request):
    """A proxy in front of a fresh sink; `@pytest.mark.parametrize('harness', [{...}], indirect=True)`
    passes config (thresholds, rules, smtp) and `lmtp`/`sink` options."""
    options = dict(getattr(request, "param", {}))
    lmtp = options.pop("lmtp", False)
    sink = Sink(lt, lmtp=lmtp, **options.pop("sink", {})).start()
    metrics = Metrics()

    def make_runtime(thresholds=HAM, rules=(), smtp=None) -> Runtime:
        data = {
            "model": {"checkpoint": str(tiny_checkpoint), "device": "cpu", "batch_size": 8},
            "thresholds": thresholds,
            "rules": list(rules),
            "smtp": {
                "downstream": f"127.0.0.1:{sink.port}",
                "protocol": "lmtp" if lmtp else "smtp",
                "downstream_timeout": 5,
                **(smtp or {}),
            },
        }
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        config = load_config(path)
        return build_runtime(config, metrics, engine=FilterEngine(config, classifier))

    proxy = smtp_proxy(make_runtime(**options), metrics, hostname="proxy.test")
    _, port = lt.run(proxy.start("127.0.0.1", 0))
    yield Harness(lt, sink, proxy, port, make_runtime)
    lt.run(proxy.shutdown(grace=2))
    sink.stop()


def test_ham_is_relayed_with_headers_and_a_byte_identical_body(harness):
    message = make_message("ham")
    assert harness.send(message) == {}
    (got,) = harness.sink.received
    assert got.mail_from == "alice@example.org"
    assert got.rcpt_tos == ["bob@example.net"]
    assert "BODY=8BITMIME" in got.mail_options
    assert any(option.startswith("SIZE=") for option in got.mail_options)
    head, body = split(message)
    got_head, got_body = split(got.content)
    assert got_body == body
    assert b"X-Spam-Flag: NO\r\n" in got_head
    assert b"X-Spam-Flag: YES" not in got_head
    assert b"X-Spam-Status: No, score=" in got_head
    assert without_our_headers(got_head) == without_our_headers(head)  # the rest, in order


def without_our_headers(head: bytes) -> bytes:
    return re.sub(rb"(?m)^X-Spam-[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", b"", head)


def test_null_sender_and_several_recipients_pass_unchanged(harness):
    rcpts = ["a@example.net", "b@example.net", "c@example.org"]
    assert harness.send(make_message("bounce"), rcpts=rcpts, sender="") == {}
    (got,) = harness.sink.received
    assert got.mail_from == "<>"
    assert got.rcpt_tos == rcpts


@pytest.mark.parametrize("harness", [{"thresholds": SPAM}], indirect=True)
def test_spam_is_tagged_by_default(harness):
    message = make_message("spam")
    harness.send(message)
    (got,) = harness.sink.received
    head, body = split(got.content)
    assert b"X-Spam-Flag: YES\r\n" in head
    assert body == split(message)[1]


PREFIX = [{"match": {"verdict": "spam"}, "actions": ["tag", "subject-prefix"]}]


@pytest.mark.parametrize("harness", [{"thresholds": SPAM, "rules": PREFIX}], indirect=True)
def test_subject_prefix_rule_rewrites_only_the_subject(harness):
    message = make_message("prefixed")
    harness.send(message)
    (got,) = harness.sink.received
    head, body = split(got.content)
    assert b"\r\nSubject: [SPAM] test prefixed\r\n" in head
    assert body == split(message)[1]


REDIRECT = [{"match": {"verdict": "spam"}, "actions": ["tag", {"redirect": "quarantine@example.net"}]}]


@pytest.mark.parametrize("harness", [{"thresholds": SPAM, "rules": REDIRECT}], indirect=True)
def test_redirect_delivers_only_to_the_quarantine_with_the_original_recipients_in_a_header(harness):
    assert harness.send(make_message("redirect"), rcpts=["bob@example.net", "eve@example.org"]) == {}
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["quarantine@example.net"]
    assert b"X-Spam-Original-Recipients: bob@example.net, eve@example.org" in got.content


REJECT = [{"match": {"verdict": "spam"}, "actions": [{"reject": "No spam here"}]}]


@pytest.mark.parametrize("harness", [{"thresholds": SPAM, "rules": REJECT}], indirect=True)
def test_reject_rule_answers_554_and_relays_nothing(harness):
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("reject"))
    assert err.value.smtp_code == 554
    assert err.value.smtp_error.startswith(b"5.7.1 No spam here")
    assert harness.sink.received == []
    # The session stays usable for the next message: the downstream transaction was reset.
    harness.reconfigure(thresholds=HAM, rules=REJECT)
    assert harness.send(make_message("after-reject")) == {}
    assert len(harness.sink.received) == 1


TEMPFAIL = [{"match": {"verdict": "spam"}, "actions": ["tempfail"]}]


@pytest.mark.parametrize("harness", [{"thresholds": SPAM, "rules": TEMPFAIL}], indirect=True)
def test_tempfail_rule_answers_451(harness):
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("tempfail"))
    assert err.value.smtp_code == 451
    assert err.value.smtp_error.startswith(b"4.7.1")
    assert harness.sink.received == []


@pytest.mark.parametrize("harness", [{"thresholds": HAM, "rules": REJECT}], indirect=True)
def test_gtube_is_caught_whatever_the_thresholds(harness):
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("gtube", body=b"test\r\n" + GTUBE + b"\r\n"))
    assert err.value.smtp_code == 554
    assert harness.send(make_message("plain")) == {}


def test_downstream_down_gives_4xx_and_the_retry_arrives_exactly_once(harness):
    message = make_message("retry")
    harness.send(make_message("warm-up"))  # the session cache now holds a live connection
    harness.sink.stop()
    with pytest.raises(smtplib.SMTPSenderRefused) as err:
        harness.send(message)
    assert err.value.smtp_code == 451
    with harness.client() as conn:  # a client that only pauses downstream mid-transaction
        conn.ehlo()
        assert conn.mail("alice@example.org")[0] == 451
    harness.sink.start()
    assert harness.send(message) == {}
    assert [split(r.content)[1] for r in harness.sink.received[1:]] == [split(message)[1]]


def test_downstream_lost_between_rcpt_and_data_gives_4xx(harness):
    with harness.client() as conn:
        conn.ehlo()
        assert conn.mail("alice@example.org")[0] == 250
        assert conn.rcpt("bob@example.net")[0] == 250
        harness.sink.stop()
        code, _ = conn.data(make_message("lost"))
        assert 400 <= code < 500
    harness.sink.start()
    assert harness.sink.received == []


@pytest.mark.parametrize(
    "harness",
    [{"sink": {}}],
    indirect=True,
)
def test_downstream_refusals_are_passed_through_per_recipient(harness):
    harness.sink.handler.rcpt_replies["nobody@example.net"] = "550 5.1.1 <nobody@example.net>: no such user"
    refused = harness.send(make_message("partial"), rcpts=["bob@example.net", "nobody@example.net"])
    assert refused == {"nobody@example.net": (550, b"5.1.1 <nobody@example.net>: no such user")}
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["bob@example.net"]

    harness.sink.handler.data_reply = "554 5.6.0 Content refused downstream"
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("refused"))
    assert (err.value.smtp_code, err.value.smtp_error) == (554, b"5.6.0 Content refused downstream")

    harness.sink.handler.data_reply = "421 4.3.0 Downstream closing"
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("closing"))
    assert err.value.smtp_code == 451  # a downstream 421 must not read as "the proxy is closing"


@pytest.mark.parametrize(
    "harness", [{"sink": {"data_size_limit": None, "enable_SMTPUTF8": False}}], indirect=True
)
def test_mail_parameters_reach_downstream_only_where_it_announced_them(harness):
    with harness.client() as conn:
        conn.sendmail(
            "alice@example.org", ["bob@example.net"], make_message("p"), ["SMTPUTF8", "BODY=8BITMIME"]
        )
    (got,) = harness.sink.received
    assert got.mail_options == ["BODY=8BITMIME"]


@pytest.mark.parametrize("harness", [{"smtp": {"max_message_size": 4000}}], indirect=True)
def test_oversize_message_gets_552(harness):
    big = make_message("big", body=b"y" * 70 + b"\r\n") * 80
    with pytest.raises(smtplib.SMTPSenderRefused) as err:  # refused at MAIL FROM SIZE=...
        harness.send(big)
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (552, b"5.3.4")
    with harness.client() as conn:  # a client that does not declare SIZE finds out after DATA
        conn.ehlo()
        conn.mail("alice@example.org")
        conn.rcpt("bob@example.net")
        code, text = conn.data(big)
        assert (code, text[:5]) == (552, b"5.3.4")
    with harness.client() as conn:
        assert b"SIZE 4000" in conn.ehlo()[1]
    assert harness.sink.received == []


@pytest.mark.parametrize("harness", [{"smtp": {"max_recipients": 2}}], indirect=True)
def test_too_many_recipients_get_452(harness):
    refused = harness.send(make_message("r"), rcpts=["a@example.net", "b@example.net", "c@example.net"])
    assert refused == {"c@example.net": (452, b"4.5.3 Too many recipients")}
    assert harness.sink.received[0].rcpt_tos == ["a@example.net", "b@example.net"]


@pytest.mark.parametrize("harness", [{"smtp": {"max_sessions": 2}}], indirect=True)
def test_sessions_over_the_limit_get_421(harness):
    first, second = harness.client(), harness.client()
    with pytest.raises(smtplib.SMTPConnectError) as err:
        harness.client()
    assert err.value.smtp_code == 421
    assert err.value.smtp_error.startswith(b"4.7.0")
    first.quit()
    second.quit()
    assert harness.send(make_message("after")) == {}
    assert harness.proxy.metrics.sessions_refused == 1


def test_ehlo_announces_the_extensions(harness):
    with harness.client() as conn:
        conn.ehlo()
        for extension in ("size", "8bitmime", "smtputf8", "pipelining"):
            assert conn.has_extn(extension), extension


@pytest.mark.parametrize("harness", [{"smtp": {"batch_wait_ms": 20}}], indirect=True)
def test_twenty_concurrent_clients_ten_messages_each_arrive_exactly_once_intact(harness):
    def client(n: int) -> None:
        with harness.client() as conn:
            for i in range(10):
                assert (
                    conn.sendmail("alice@example.org", [f"user{n}@example.net"], make_message(f"{n}-{i}"))
                    == {}
                )

    with ThreadPoolExecutor(20) as pool:
        list(pool.map(client, range(20)))
    got = harness.sink.received
    assert len(got) == 200
    ids = sorted(r.content.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0] for r in got)
    assert ids == sorted(f"{n}-{i}".encode() for n in range(20) for i in range(10))
    assert all(split(r.content)[1] == BODY for r in got)
    metrics = harness.proxy.metrics
    assert metrics.batched_messages == 200
    assert metrics.batches < 200  # concurrent messages shared model calls


def _break_classifier(harness, delay: float | None = None) -> None:
    engine = harness.proxy.runtime.engine

    def broken(messages, envelopes):
        if delay is None:
            raise RuntimeError("model exploded")
        threading.Event().wait(delay)
        return FilterEngine.check_many(engine, messages, envelopes)

    engine.check_many = broken


@pytest.mark.parametrize("harness", [{"smtp": {"classify_timeout": 0.3}}], indirect=True)
def test_classifier_failure_or_timeout_passes_the_message_unchecked_by_default(harness):
    _break_classifier(harness)
    harness.send(make_message("broken"))
    _break_classifier(harness, delay=2)
    harness.send(make_message("slow"))
    assert len(harness.sink.received) == 2
    for got in harness.sink.received:
        head, body = split(got.content)
        assert b"X-Spam-Status: unchecked\r\n" in head
        assert b"X-Spam-Flag" not in head  # the forged flag is gone too
        assert body == BODY
    assert harness.proxy.metrics.errors["classifier"] == 2


@pytest.mark.parametrize(
    "harness", [{"smtp": {"on_classifier_error": "tempfail", "classify_timeout": 0.3}}], indirect=True
)
def test_classifier_failure_can_tempfail_instead(harness):
    _break_classifier(harness)
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("broken"))
    assert (err.value.smtp_code, err.value.smtp_error[:5]) == (451, b"4.7.1")
    assert harness.sink.received == []


@pytest.mark.parametrize("harness", [{"smtp": {"data_timeout": 0.5, "classify_timeout": 5}}], indirect=True)
def test_per_message_deadline_answers_4xx(harness):
    _break_classifier(harness, delay=2)
    with pytest.raises(smtplib.SMTPDataError) as err:
        harness.send(make_message("deadline"))
    assert err.value.smtp_code == 451
    assert harness.sink.received == []


LMTP_SPAM_REDIRECT = {"lmtp": True, "thresholds": SPAM, "rules": REDIRECT}


@pytest.mark.parametrize("harness", [{"lmtp": True}], indirect=True)
def test_lmtp_answers_data_once_per_recipient_with_the_downstream_replies(harness):
    harness.sink.handler.lmtp_data_replies["full@example.net"] = "452 4.2.2 Mailbox full"
    with harness.client(lmtp=True) as conn:
        assert conn.docmd("EHLO", "client.test")[0] == 500  # LMTP speaks LHLO only
        assert conn.ehlo()[0] == 250  # smtplib.LMTP sends LHLO here
        assert conn.mail("alice@example.org")[0] == 250
        assert conn.rcpt("bob@example.net")[0] == 250
        assert conn.rcpt("full@example.net")[0] == 250
        first = conn.data(make_message("lmtp"))
        second = conn.getreply()
    assert first[0] == 250
    assert second == (452, b"4.2.2 Mailbox full")
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["bob@example.net"]


@pytest.mark.parametrize("harness", [LMTP_SPAM_REDIRECT], indirect=True)
def test_lmtp_redirect_answers_every_recipient_with_the_quarantine_result(harness):
    with harness.client(lmtp=True) as conn:
        conn.ehlo()
        conn.mail("alice@example.org")
        conn.rcpt("bob@example.net")
        conn.rcpt("eve@example.net")
        assert conn.data(make_message("lmtp-spam"))[0] == 250
        assert conn.getreply()[0] == 250
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["quarantine@example.net"]


def test_health_and_metrics_endpoints(harness, lt):
    metrics = harness.proxy.metrics
    metrics.model_id = harness.proxy.runtime.engine.model_id
    health = HealthServer(metrics)
    host, port = lt.run(health.start("127.0.0.1", 0))
    base = f"http://{host}:{port}"
    try:
        harness.send(make_message("m"))
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/readyz", timeout=5)
        assert err.value.code == 503
        metrics.ready = True
        assert urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200
        text = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'spamfilterd_messages_total{verdict="ham",action="delivered"} 1' in text
        assert "spamfilterd_message_duration_seconds_count 1" in text
        assert f'spamfilterd_model_info{{model_id="{metrics.model_id}"}} 1' in text
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/nothing", timeout=5)
        assert err.value.code == 404
    finally:
        lt.run(health.close())


def test_sigterm_style_shutdown_finishes_the_open_transaction(harness, lt):
    conn = harness.client()
    conn.ehlo()
    conn.mail("alice@example.org")
    conn.rcpt("bob@example.net")
    idle = harness.client()
    idle.ehlo()
    shutdown = asyncio.run_coroutine_threadsafe(harness.proxy.shutdown(grace=10), lt.loop)
    while not harness.proxy.draining:
        time.sleep(0.01)
    assert idle.noop()[0] == 421  # an idle session is told 421 and closed at once
    assert conn.data(make_message("in-flight"))[0] == 250
    assert shutdown.result(10) is True
    assert len(harness.sink.received) == 1
    with pytest.raises(OSError):
        harness.client()


def test_dot_stuffing_and_reply_rendering():
    from spamfilterd.relay import Reply, dot_stuff, esmtp_params

    def stuffed(message: bytes) -> bytes:
        return b"".join(dot_stuff(message))

    assert stuffed(b".a\r\nb\r\n.\r\n..c\r\nd") == b"..a\r\nb\r\n..\r\n...c\r\nd\r\n.\r\n"
    # Only CRLF ends a line on the wire: bare LF and CR become CRLF, and then get their dots doubled.
    assert stuffed(b"a\n.\nb\r.\r\nc\r\n") == b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"
    assert Reply(250, ("first", "second")).render() == "250-first\r\n250 second"
    assert logfmt({"a": "x y", "b": "250-a\r\n250 b", "c": 3}) == 'a="x y" b="250-a 250 b" c=3'
    assert esmtp_params(["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"], {"SIZE": "100"}) == ["SIZE=10"]


def test_the_header_block_is_read_once_per_message(harness, caplog, monkeypatch):
    """The door reads it (the logged Message-ID) and hands that reading on: text, rules and tagging
    of every recipient group, and the unchecked copy after a classifier failure, read no more."""
    caplog.set_level("INFO", logger="spamfilterd.smtp")
    reads = count_header_reads(monkeypatch)
    with harness.client() as conn:
        for tag in ("once-1", "once-2"):
            assert conn.sendmail("alice@example.org", ["bob@example.net"], make_message(tag)) == {}
    harness.reconfigure(rules=SHIPPED_RULES)  # GTUBE: users tagged as spam, postmaster as ham
    rcpts = ["bob@example.net", "postmaster@example.net"]
    assert harness.send(make_message("once-split", body=GTUBE + b"\r\n"), rcpts=rcpts) == {}
    _break_classifier(harness)
    assert harness.send(make_message("once-unchecked")) == {}
    tags = ["once-1", "once-2", "once-split", "once-unchecked"]
    assert [reads_of(reads, tag) for tag in tags] == [1, 1, 1, 1]
    received = [r.content for r in harness.sink.received]
    assert [reads_of(received, tag) for tag in tags] == [1, 1, 2, 1]  # split: two transactions
    assert b"X-Spam-Flag: NO\r\n" in received[0] and b"X-Spam-Status: unchecked\r\n" in received[-1]
    logged = " ".join(LogfmtFormatter().format(r) for r in caplog.records if r.name == "spamfilterd.smtp")
    assert all(f"message_id=<{tag}@test.example>" in logged for tag in tags)


def test_log_line_has_the_fields_and_no_body(harness, caplog):
    caplog.set_level("INFO", logger="spamfilterd.smtp")
    harness.send(make_message("logged"), rcpts=["a@example.net", "b@example.net"])
    (line,) = [LogfmtFormatter().format(r) for r in caplog.records if r.name == "spamfilterd.smtp"]
    for part in (
        "message_id=<logged@test.example>",
        "from=alice@example.org",
        "rcpts=2",
        "verdict=ham",
        "action=delivered",
        "model=tiny-test@",
    ):
        assert part in line
    assert "Köln" not in line and "x" * 100 not in line


def test_pipelined_commands_get_their_replies_in_order(harness):
    message = make_message("pipelined").replace(b"\r\n.", b"\r\n..")
    with socket.create_connection(("127.0.0.1", harness.port), timeout=30) as sock:
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        sock.send(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.send(
            b"MAIL FROM:<alice@example.org> BODY=8BITMIME\r\n"
            b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"
        )
        replies = [reader.readline()[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"250", b"354"]
        sock.send(message + b".\r\nQUIT\r\n")
        assert reader.readline().startswith(b"250 ")
        assert reader.readline().startswith(b"221 ")
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["bob@example.net", "carol@example.net"]


def test_smtputf8_envelope_passes_unchanged(harness):
    with harness.client() as conn:
        options = ["SMTPUTF8", "BODY=8BITMIME"]
        assert conn.sendmail("jörg@exämple.org", ["zoë@example.net"], make_message("utf8"), options) == {}
    (got,) = harness.sink.received
    assert (got.mail_from, got.rcpt_tos) == ("jörg@exämple.org", ["zoë@example.net"])
    assert "SMTPUTF8" in got.mail_options


def test_a_downstream_that_never_answers_gives_451(harness, lt):
    async def silent_server():
        return await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)

    server = lt.run(silent_server())
    try:
        port = server.sockets[0].getsockname()[1]
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{port}", "downstream_timeout": 0.5})
        with pytest.raises(smtplib.SMTPSenderRefused) as err:
            harness.send(make_message("silence"))
        assert (err.value.smtp_code, err.value.smtp_error[:5]) == (451, b"4.4.1")
    finally:
        lt.call(server.close)


@pytest.mark.parametrize("harness", [{"smtp": {"data_timeout": 0.5}}], indirect=True)
def test_a_client_stalling_in_data_is_cut_off_without_a_reply(harness):
    conn = harness.client()
    conn.ehlo()
    conn.mail("alice@example.org")
    conn.rcpt("bob@example.net")
    conn.putcmd("data")
    assert conn.getreply()[0] == 354
    conn.send(make_message("stalled")[:100])
    with pytest.raises(smtplib.SMTPServerDisconnected):
        conn.getreply()  # no reply at all: the client keeps the message and retries
    assert harness.sink.received == []


def _send_with_dsn(harness) -> None:
    with harness.client() as conn:
        conn.ehlo()
        assert conn.mail("alice@example.org", ["RET=HDRS", "ENVID=QQ314159"])[0] == 250
        assert (
            conn.rcpt("bob@example.net", ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;Bob@Example.NET"])[0] == 250
        )
        assert conn.data(make_message("dsn"))[0] == 250


def test_dsn_parameters_reach_a_dsn_downstream_unchanged(harness):
    _send_with_dsn(harness)  # as Postfix's before-queue proxy forwards them, whatever we announce
    assert harness.sink.handler.commands == [
        "FROM:<alice@example.org> RET=HDRS ENVID=QQ314159",
        "TO:<bob@example.net> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;Bob@Example.NET",
    ]


@pytest.mark.parametrize("harness", [{"sink": {"dsn": False}}], indirect=True)
def test_dsn_parameters_are_dropped_for_a_downstream_without_dsn(harness):
    _send_with_dsn(harness)
    assert harness.sink.handler.commands == ["FROM:<alice@example.org>", "TO:<bob@example.net>"]


class FakeMTA:
    """A scripted downstream on a raw socket, for answers no well-behaved server gives: a reply
    other than 354 to DATA, replies nobody asked for, a greeting that comes late."""

    def __init__(self, lt: LoopThread, data_reply: bytes = b"354 Go ahead\r\n", end_reply=None, delay=0.0):
        self.lt = lt
        self.data_reply = data_reply
        self.end_reply = end_reply or (lambda content: b"250 2.0.0 Ok\r\n")
        self.delay = delay
        self.messages: list[bytes] = []
        self.commands: list[bytes] = []
        self.opened = self.closed = 0

        async def start():
            return await asyncio.start_server(self._serve, "127.0.0.1", 0)

        self.server = lt.run(start())
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader, writer):
        self.opened += 1
        try:
            await asyncio.sleep(self.delay)
            writer.write(b"220 fake ESMTP\r\n")
            while line := await reader.readline():
                command = line[:4].upper()
                self.commands.append(command)
                if command in (b"EHLO", b"LHLO"):
                    writer.write(b"250-fake\r\n250 8BITMIME\r\n")
                elif command == b"DATA":
                    writer.write(self.data_reply)
                    if self.data_reply.startswith(b"354"):
                        content = await reader.readuntil(b"\r\n.\r\n")
                        self.messages.append(content)
                        writer.write(self.end_reply(content))
                elif command == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            writer.close()

    def close(self) -> None:
        self.lt.loop.call_soon_threadsafe(self.server.close)


def _wait_for(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class RawClient:
    """A raw-socket client past the greeting and EHLO, for what smtplib will not send."""

    def __init__(self, port: int, *lines: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.reader = self.sock.makefile("rb")
        assert self.reader.readline().startswith(b"220 ")
        self.sock.send(b"EHLO client.test\r\n")
        while not self.reader.readline().startswith(b"250 "):
            pass
        self.send(*lines)

    def send(self, *lines: bytes) -> None:
        self.sock.send(b"".join(lines))

    def replies(self, count: int) -> list[bytes]:
        return [self.reader.readline().rstrip(b"\r\n") for _ in range(count)]

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc) -> None:
        self.reader.close()
        self.sock.close()


TRANSACTION = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"


# --- issue 9: hostile clients and real MTAs -------------------------------------------------------


@pytest.mark.parametrize("harness", [{"smtp": {"max_message_size": 100_000}}], indirect=True)
def test_an_unterminated_data_line_costs_no_more_than_the_size_limit(harness):
    import tracemalloc

    tracemalloc.start()
    try:
        with RawClient(harness.port, TRANSACTION) as sock:
            assert [r[:3] for r in sock.replies(3)] == [b"250", b"250", b"354"]
            tracemalloc.reset_peak()
            chunk = b"y" * 65_536
            for _ in range(160):  # 10 MiB without a line end
                sock.send(chunk)
            sock.send(b"\r\n.\r\n")
            (reply,) = sock.replies(1)
            peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert reply.startswith(b"552 5.3.4")
    assert peak < 2_000_000  # the limit plus buffers, not the 10 MiB sent
    assert harness.sink.received == []
    assert harness.proxy.bytes_in_flight == 0


def test_lines_longer_than_64k_are_relayed_intact(harness):
    body = b"start\r\n" + b"z" * 300_000 + b"\r\n." + b"w" * 70_000 + b"\r\nend\r\n"
    assert harness.send(make_message("long", body=body)) == {}
    (got,) = harness.sink.received
    assert split(got.content)[1] == body


def test_refusals_carry_enhanced_status_codes(harness):
    with harness.client() as conn:
        conn.ehlo()
        assert conn.docmd("RCPT TO:<bob@example.net>") == (503, b"5.5.1 Error: need MAIL command")
        conn.mail("alice@example.org")
        assert conn.docmd("DATA") == (503, b"5.5.1 Error: need RCPT command")


def test_smuggled_second_message_stays_inside_the_first(harness):
    smuggled = (
        b"Subject: hi\r\n\r\nhello\n.\nMAIL FROM:<evil@example.org>\nRCPT TO:<victim@example.net>\n"
        b"DATA\nSubject: smuggled\n\nfree money\r\n.\r\n"
    )
    with RawClient(harness.port, TRANSACTION) as sock:
        assert [r[:3] for r in sock.replies(3)] == [b"250", b"250", b"354"]
        sock.send(smuggled)
        assert sock.replies(1)[0][:3] == b"250"
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["b@example.net"]
    body = split(got.content)[1]
    assert body == b"hello\r\n.\r\nMAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.net>\r\n" + (
        b"DATA\r\nSubject: smuggled\r\n\r\nfree money\r\n"
    )
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", got.content) is None  # no bare CR or LF reaches downstream


def test_replies_nobody_asked_for_drop_the_downstream_connection(harness, lt):
    def end_reply(content: bytes) -> bytes:
        if b"second" in content:
            return b"554 5.7.1 Refused\r\n"
        return b"250 2.0.0 Ok: first\r\n250 2.0.0 Ok: stale\r\n"  # as after a smuggled message

    fake = FakeMTA(lt, end_reply=end_reply)
    try:
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{fake.port}"})
        with harness.client() as conn:
            with pytest.raises(smtplib.SMTPDataError) as err:  # one reply too many: which is ours?
                conn.sendmail("a@example.org", ["b@example.net"], make_message("first"))
            assert err.value.smtp_code == 451
            with pytest.raises(smtplib.SMTPDataError) as err:  # not the stale 250
                conn.sendmail("a@example.org", ["b@example.net"], make_message("second"))
            assert err.value.smtp_code == 554
        assert fake.opened == 2  # the confused connection was dropped, the second went on a new one
    finally:
        fake.close()


@pytest.mark.parametrize("answer", [b"250 2.0.0 Ok\r\n", b"334 What\r\n"])
def test_anything_but_354_to_data_is_a_tempfail(harness, lt, answer):
    fake = FakeMTA(lt, data_reply=answer)
    try:
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{fake.port}"})
        with pytest.raises(smtplib.SMTPDataError) as err:
            harness.send(make_message("no-354"))
        assert err.value.smtp_code == 451
        assert fake.messages == []
    finally:
        fake.close()


def test_a_downstream_refusal_of_data_is_passed_on(harness, lt):
    fake = FakeMTA(lt, data_reply=b"554 5.5.1 No valid recipients\r\n")
    try:
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{fake.port}"})
        with pytest.raises(smtplib.SMTPDataError) as err:
            harness.send(make_message("refused"))
        assert (err.value.smtp_code, err.value.smtp_error) == (554, b"5.5.1 No valid recipients")
    finally:
        fake.close()


def test_downstream_is_closed_when_the_client_hangs_up_while_we_connect(harness, lt):
    fake = FakeMTA(lt, delay=0.5)
    try:
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{fake.port}"})
        sock = socket.create_connection(("127.0.0.1", harness.port), timeout=30)
        sock.recv(1000)
        sock.send(b"HELO client.test\r\nMAIL FROM:<a@example.org>\r\n")
        assert _wait_for(lambda: fake.opened == 1)
        sock.close()
        assert _wait_for(lambda: fake.closed == 1)
    finally:
        fake.close()


@pytest.mark.parametrize("harness", [{"smtp": {"command_timeout": 0.5}}], indirect=True)
def test_a_session_that_only_sends_noop_and_rset_is_closed(harness):
    conn = harness.client()
    conn.ehlo()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        for _ in range(40):  # 4 s, eight times command_timeout
            conn.noop()
            conn.rset()
            time.sleep(0.1)
    conn.close()


@pytest.mark.parametrize(
    "harness", [{"smtp": {"max_message_size": 10_000, "max_bytes_in_flight": 10_000}}], indirect=True
)
def test_bytes_in_flight_are_bounded_for_all_sessions_together(harness):
    with RawClient(harness.port, TRANSACTION) as slow:
        assert [r[:3] for r in slow.replies(3)] == [b"250", b"250", b"354"]
        first = make_message("slow", body=b"x" * 70 + b"\r\n") + b"y" * 7000 + b"\r\n"
        slow.send(first)
        assert _wait_for(lambda: harness.proxy.bytes_in_flight == len(first))
        with pytest.raises(smtplib.SMTPDataError) as err:
            harness.send(make_message("other", body=b"z" * 5000 + b"\r\n"))
        assert (err.value.smtp_code, err.value.smtp_error[:5]) == (451, b"4.3.1")
        slow.send(b".\r\n")
        assert slow.replies(1)[0][:3] == b"250"
    assert harness.proxy.bytes_in_flight == 0
    assert harness.send(make_message("later", body=b"z" * 5000 + b"\r\n")) == {}


def test_a_non_utf8_address_is_refused_at_rcpt(harness):
    with RawClient(harness.port, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<\xff@example.net>\r\n") as sock:
        assert sock.replies(2)[1] == b"553 5.1.3 Recipient address is not valid UTF-8"
    with RawClient(harness.port, b"MAIL FROM:<\xfe@example.org>\r\n") as sock:
        assert sock.replies(1) == [b"553 5.1.7 Sender address is not valid UTF-8"]


def test_one_message_that_breaks_the_engine_does_not_fail_its_batch(harness):
    engine = harness.proxy.runtime.engine
    batch_sizes = []

    def poisoned(messages, envelopes):
        batch_sizes.append(len(messages))
        if any(b"blocker" in message.raw for message in messages):
            time.sleep(1.0)  # keeps the one worker busy, so the next two messages gather into one batch
        if any(b"poison" in message.raw for message in messages):
            raise UnicodeEncodeError("utf-8", "\udcff", 0, 1, "surrogates not allowed")
        return FilterEngine.check_many(engine, messages, envelopes)

    engine.check_many = poisoned
    with ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(harness.send, make_message("blocker"))
        assert _wait_for(lambda: batch_sizes == [1])
        list(pool.map(lambda tag: harness.send(make_message(tag)), ["poison", "good"]))
        blocker.result()
    assert batch_sizes[:2] == [1, 2]  # the blocker alone, then poison and good in one batch
    statuses = {
        r.content.split(b"Message-ID: <", 1)[1].split(b"@", 1)[0]: re.search(
            rb"X-Spam-Status: (\w+)", r.content
        )[1]
        for r in harness.sink.received
    }
    assert statuses == {b"blocker": b"No", b"poison": b"unchecked", b"good": b"No"}


SHIPPED_RULES = yaml.safe_load((Path(__file__).parents[1] / "config.yaml").read_text())["rules"]


@pytest.mark.parametrize("harness", [{"rules": SHIPPED_RULES}], indirect=True)
def test_shipped_config_gtube_to_postmaster_and_users_filters_the_users(harness):
    gtube = make_message("gtube", body=b"test\r\n" + GTUBE + b"\r\n")
    rcpts = ["bob@example.net", "carol@example.net", "postmaster@example.net"]
    assert harness.send(gtube, rcpts=rcpts) == {}
    users, postmaster = harness.sink.received
    assert users.rcpt_tos == ["bob@example.net", "carol@example.net"]
    assert b"X-Spam-Flag: YES\r\n" in users.content
    assert b"\r\nSubject: [SPAM] test gtube\r\n" in users.content
    assert postmaster.rcpt_tos == ["postmaster@example.net"]
    assert b"X-Spam-Flag: NO\r\n" in postmaster.content and b"rule=postmaster" in postmaster.content
    assert split(users.content)[1] == split(postmaster.content)[1] == split(gtube)[1]


REJECT_BUT_POSTMASTER = [
    {"match": {"recipient_in": ["postmaster@*"]}, "actions": ["accept"]},
    {"match": {"verdict": "spam"}, "actions": [{"reject": "No spam"}]},
]


@pytest.mark.parametrize("harness", [{"rules": REJECT_BUT_POSTMASTER}], indirect=True)
def test_smtp_keeps_recipients_the_rules_may_answer_differently_apart(harness):
    gtube = make_message("gtube", body=GTUBE + b"\r\n")
    with harness.client() as conn:
        conn.ehlo()
        assert conn.mail("alice@example.org")[0] == 250
        assert conn.rcpt("bob@example.net")[0] == 250
        assert conn.rcpt("carol@example.net")[0] == 250  # same policy as bob
        assert conn.rcpt("postmaster@example.net") == (452, OTHER_POLICY[4:].encode())
        assert conn.data(gtube)[0] == 554
        assert conn.sendmail("alice@example.org", ["postmaster@example.net"], gtube) == {}
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["postmaster@example.net"]


@pytest.mark.parametrize("harness", [{"lmtp": True, "rules": REJECT_BUT_POSTMASTER}], indirect=True)
def test_lmtp_answers_each_recipient_by_its_own_rule(harness):
    with harness.client(lmtp=True) as conn:
        conn.ehlo()
        conn.mail("alice@example.org")
        for rcpt in ("bob@example.net", "postmaster@example.net", "carol@example.net"):
            assert conn.rcpt(rcpt)[0] == 250
        assert conn.data(make_message("gtube", body=GTUBE + b"\r\n"))[0] == 554
        assert [conn.getreply()[0] for _ in range(2)] == [250, 554]
    (got,) = harness.sink.received
    assert got.rcpt_tos == ["postmaster@example.net"]
    assert b"X-Spam-Flag: NO" in got.content


@pytest.mark.parametrize("dsn", [True, False])
def test_ehlo_announces_dsn_exactly_when_downstream_does(lt, harness, dsn):
    harness.sink.handler.dsn = dsn
    with harness.client() as conn:
        conn.ehlo()
        assert conn.has_extn("dsn") is dsn


@pytest.mark.parametrize("harness", [{"thresholds": SPAM, "rules": REDIRECT}], indirect=True)
def test_an_unknown_redirect_address_fails_the_check_of_the_config(harness):
    config = harness.proxy.runtime.config
    harness.lt.run(harness.proxy.verify(config))  # downstream knows it
    harness.sink.handler.rcpt_replies["quarantine@example.net"] = "550 5.1.1 User unknown"
    with pytest.raises(QuarantineError, match=r"quarantine@example.net: 550 5.1.1 User unknown"):
        harness.lt.run(harness.proxy.verify(config))
    harness.sink.stop()  # a downstream that is down only warns: it may start after us
    harness.lt.run(harness.proxy.verify(config))


def test_after_a_refused_data_command_the_session_goes_on(harness, lt):
    fake = FakeMTA(lt, data_reply=b"451 4.3.0 Try later\r\n")
    try:
        harness.reconfigure(smtp={"downstream": f"127.0.0.1:{fake.port}"})
        with harness.client() as conn:
            for tag in ("one", "two"):
                with pytest.raises(smtplib.SMTPDataError) as err:
                    conn.sendmail("a@example.org", ["b@example.net"], make_message(tag))
                assert err.value.smtp_code == 451
        assert fake.opened == 1
        assert fake.commands.count(b"DATA") == 2
        assert fake.commands[fake.commands.index(b"DATA") + 1] == b"RSET"  # no nested MAIL next
    finally:
        fake.close()


def test_two_interleaved_connections_keep_their_own_transactions(harness):
    """One handler serves every connection: each transaction downstream lives on its own session."""
    first, second = harness.client(), harness.client()
    for conn in (first, second):
        conn.ehlo()
    assert first.mail("alice@example.org")[0] == 250
    assert second.mail("carol@example.org")[0] == 250
    assert first.rcpt("bob@example.net", ["NOTIFY=FAILURE"])[0] == 250
    assert second.rcpt("dave@example.net")[0] == 250
    assert first.rcpt("eve@example.net")[0] == 250
    first.rset()  # abandons only the first connection's transaction
    assert second.data(make_message("second"))[0] == 250
    assert first.sendmail("alice@example.org", ["frank@example.net"], make_message("first")) == {}
    first.quit()
    second.quit()
    got = {(r.mail_from, tuple(r.rcpt_tos)) for r in harness.sink.received}
    assert got == {
        ("carol@example.org", ("dave@example.net",)),
        ("alice@example.org", ("frank@example.net",)),
    }
    assert len(harness.sink.sessions) == 2  # one downstream connection per client connection
