"""Helpers shared by the test modules: a loop thread, a real aiosmtpd sink, message and corpus builders,
the receiving end of sd_notify. Fixtures built on them are in conftest.py."""

from __future__ import annotations

import asyncio
import mailbox
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

import pytest
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from spamfilterd.message import Header, read_header

DSN_PARAMS = {"RET", "ENVID", "NOTIFY", "ORCPT"}
HAM = {"spam": 1.01, "unsure": 1.01}  # every score is below: everything is ham
SPAM = {"spam": 0.0, "unsure": 0.0}  # every score is at or above: everything is spam

BODY = (
    "Grüße aus Köln!\r\n"
    ".a line that starts with a dot\r\n"
    "..and one with two\r\n"
    "tab\tand trailing blanks   \r\n" + "x" * 1500 + "\r\n"
    "\r\n"
    "=?utf-8?q?not_decoded?= \x7f\r\n"
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


def count_header_reads(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Wrap `message.read_header` in every spamfilterd module that holds it; the returned list gets
    the raw bytes of each read, so a test can count the reads of each message (by its Message-ID)."""
    reads: list[bytes] = []

    def counting(raw: bytes) -> Header:
        reads.append(bytes(raw))
        return read_header(raw)

    for name, module in list(sys.modules.items()):
        if name.partition(".")[0] == "spamfilterd" and getattr(module, "read_header", None) is read_header:
            monkeypatch.setattr(module, "read_header", counting)
    return reads


def reads_of(reads: list[bytes], tag: str) -> int:
    """How many of `reads` were of the message `make_message(tag)` (or a copy of it)."""
    return sum(f"<{tag}@test.example>".encode() in raw for raw in reads)


class LoopThread:
    """An event loop in a daemon thread; `run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, function, *args):
        """Runs a plain callable on the loop's thread and waits: asyncio objects such as a Server are
        not thread-safe, and closing one from the test thread races the loop's own work on it."""

        async def on_loop():
            return function(*args)

        return self.run(on_loop())

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

    line_length_limit = 1 << 20

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


START_TIMEOUT = 90  # importing torch on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Notifications:
    """The receiving end of $NOTIFY_SOCKET, as systemd would hold it."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def wait_for(self, line: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                message = self.sock.recv(4096).decode()
            except TimeoutError:
                break
            self.seen.append(message)
            if line in message.splitlines():
                return message
        raise AssertionError(f"no {line!r} from the daemon within {timeout} s; got {self.seen}")


def email_bytes(subject: str, body: str) -> bytes:
    message = EmailMessage()
    message["From"] = "someone@example.org"
    message["To"] = "me@example.org"
    message["Subject"] = subject
    message.set_content(body)
    return message.as_bytes()


def make_mail(tmp_path: Path, n: int = 12) -> tuple[Path, Path]:
    """A maildir of ham and an mbox of spam, with one exact duplicate each."""
    ham = mailbox.Maildir(tmp_path / "ham", create=True)
    for i in [*range(n), 0]:
        ham.add(email_bytes(f"Minutes of meeting {i}", f"Hi team, notes from meeting {i} are attached. Bob"))
    spam = mailbox.mbox(tmp_path / "spam.mbox", create=True)
    for i in [*range(n), 0]:
        spam.add(email_bytes(f"WIN {i} FREE prizes", f"Claim your {i}000 GBP prize now, call 0906{i:04d}"))
    spam.flush()
    return tmp_path / "ham", tmp_path / "spam.mbox"


def make_email_corpus(root: Path, n: int = 10) -> Path:
    """Folders named as in the SpamAssassin public corpus: easy_ham, hard_ham, spam (and noise)."""
    layout = {
        "easy_ham": lambda i: email_bytes(
            f"Re: build {i} failed", f"The nightly build {i} broke on arm64. Tom"
        ),
        "hard_ham": lambda i: email_bytes(
            f"Newsletter {i}", f"Our September offers, issue {i}. Unsubscribe."
        ),
        "spam": lambda i: email_bytes(
            f"Make ${i}000 fast", f"Work from home and earn {i}000 dollars weekly!"
        ),
        "notes": lambda i: b"not mail at all",
    }
    for folder, make in layout.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i:05d}.txt").write_bytes(make(i))
    return root
