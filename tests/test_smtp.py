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
from dataclasses import dataclass, field

import pytest
import yaml
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from spamfilterd.config import load_config
from spamfilterd.engine import GTUBE, FilterEngine
from spamfilterd.http import HealthServer, Metrics
from spamfilterd.smtp import Runtime, SmtpProxy, build_runtime, logfmt, message_id

DSN_PARAMS = {"RET", "ENVID", "NOTIFY", "ORCPT"}
HAM = {"spam": 1.01, "unsure": 1.01}  # every score is below: everything is ham
SPAM = {"spam": 0.0, "unsure": 0.0}  # every score is at or above: everything is spam

BODY = (
    "Grüße aus Köln!\r\n"
    ".a line that starts with a dot\r\n"
    "..and one with two\r\n"
    "tab\tand trailing blanks   \r\n" + "x" * 1500 + "\r\n"
    "\r\n"
    "bare\nLF inside a line\r\n"
    "end\r\n"
).encode()


def make_message(tag: str, body: bytes = BODY) -> bytes:
    head = (
        "From: Alice <alice@example.org>\r\n"
        "To: bob@example.net\r\n"
        f"Subject: test {tag}\r\n"
        f"Message-ID: <{tag}@test.example>\r\n"
        "X-Spam-Flag: YES\r\n"  # forged: must not survive
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
    )
    return head.encode() + body


def split(message: bytes) -> tuple[bytes, bytes]:
    head, _, body = message.partition(b"\r\n\r\n")
    return head + b"\r\n", body


class LoopThread:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@dataclass
class Received:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    content: bytes


@dataclass
class SinkHandler:
    """The downstream MTA: records what it accepts; replies can be scripted per address."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # RCPT TO address -> refusal
    data_reply: str | None = None  # refuse every DATA with this reply
    lmtp_data_replies: dict[str, str] = field(default_factory=dict)  # LMTP: per-recipient refusal
    dsn: bool = True  # announce DSN, as Postfix does
    commands: list[str] = field(default_factory=list)  # raw MAIL FROM / RCPT TO arguments

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        session.host_name = hostname
        return [*responses[:-1], "250-DSN", responses[-1]] if self.dsn else responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.rcpt_replies:
            return self.rcpt_replies[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        replies = [self.lmtp_data_replies.get(r, "250 2.0.0 Ok: delivered") for r in envelope.rcpt_tos]
        accepted = [r for r, reply in zip(envelope.rcpt_tos, replies, strict=True) if reply.startswith("2")]
        if accepted:
            self.received.append(
                Received(envelope.mail_from, list(envelope.mail_options), accepted, envelope.original_content)
            )
        if isinstance(server, LMTP):
            return "\r\n".join(replies)
        return "250 2.0.0 Ok: queued"


class _LikePostfix:
    """Long lines and DSN parameters accepted; raw MAIL/RCPT arguments recorded."""

    line_length_limit = 65_536

    def _getparams(self, params):
        result = super()._getparams(params)
        return None if result is None else {k: v for k, v in result.items() if k not in DSN_PARAMS}

    async def smtp_MAIL(self, arg):
        self.event_handler.commands.append(arg)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self.event_handler.commands.append(arg)
        await super().smtp_RCPT(arg)


class SinkSMTP(_LikePostfix, SMTP):
    pass


class SinkLMTP(_LikePostfix, LMTP):
    pass


class Sink:
    """A real aiosmtpd server on 127.0.0.1 that can be stopped and restarted on the same port."""

    def __init__(self, lt: LoopThread, lmtp: bool = False, dsn: bool = True, **smtp_kwargs) -> None:
        self.lt = lt
        self.lmtp = lmtp
        self.handler = SinkHandler(dsn=dsn)
        self.smtp_kwargs = {"enable_SMTPUTF8": True, **smtp_kwargs}
        self.server: asyncio.Server | None = None
        self.sessions: list[SMTP] = []
        self.port = 0

    def _protocol(self) -> SMTP:
        session = (SinkLMTP if self.lmtp else SinkSMTP)(
            self.handler, hostname="sink.test", loop=self.lt.loop, **self.smtp_kwargs
        )
        self.sessions.append(session)
        return session

    def start(self) -> Sink:
        async def start():
            self.server = await self.lt.loop.create_server(
                self._protocol, "127.0.0.1", self.port, reuse_address=True
            )
            self.port = self.server.sockets[0].getsockname()[1]

        self.lt.run(start())
        return self

    def stop(self) -> None:
        async def stop():
            self.server.close()
            for session in self.sessions:
                if session.transport is not None:
                    session.transport.abort()
            self.sessions.clear()

        self.lt.run(stop())

    @property
    def received(self) -> list[Received]:
        return self.handler.received


@pytest.fixture(scope="module")
def lt():
    loop_thread = LoopThread()
    yield loop_thread
    loop_thread.close()


@pytest.fixture(scope="module")
def classifier(tiny_checkpoint):
    from spamfilterd.classifier import SpamClassifier

    return SpamClassifier.load(tiny_checkpoint, device="cpu", threads=1)


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

    proxy = SmtpProxy(make_runtime(**options), metrics, hostname="proxy.test")
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

    def broken(raws, envelopes):
        if delay is None:
            raise RuntimeError("model exploded")
        threading.Event().wait(delay)
        return FilterEngine.check_many(engine, raws, envelopes)

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

    assert dot_stuff(b".a\r\nb\r\n.\r\n..c\r\nd\n.e") == b"..a\r\nb\r\n..\r\n...c\r\nd\n.e\r\n.\r\n"
    assert Reply(250, ("first", "second")).render() == "250-first\r\n250 second"
    assert logfmt({"a": "x y", "b": "250-a\r\n250 b", "c": 3}) == 'a="x y" b="250-a 250 b" c=3'
    assert message_id(b"Subject: x\r\nMessage-Id:\r\n <a@b>\r\n\r\nMessage-ID: <body>\r\n") == "<a@b>"
    assert esmtp_params(["SIZE=10", "BODY=8BITMIME", "SMTPUTF8"], {"SIZE": "100"}) == ["SIZE=10"]


def test_log_line_has_the_fields_and_no_body(harness, caplog):
    caplog.set_level("INFO", logger="spamfilterd.smtp")
    harness.send(make_message("logged"), rcpts=["a@example.net", "b@example.net"])
    (line,) = [r.getMessage() for r in caplog.records if r.name == "spamfilterd.smtp"]
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
        sock.sendall(b"EHLO client.test\r\n")
        while not reader.readline().startswith(b"250 "):
            pass
        sock.sendall(
            b"MAIL FROM:<alice@example.org> BODY=8BITMIME\r\n"
            b"RCPT TO:<bob@example.net>\r\nRCPT TO:<carol@example.net>\r\nDATA\r\n"
        )
        replies = [reader.readline()[:3] for _ in range(4)]
        assert replies == [b"250", b"250", b"250", b"354"]
        sock.sendall(message + b".\r\nQUIT\r\n")
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
        server.close()


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
