"""Downstream delivery: a small asyncio SMTP/LMTP client that hands back every reply verbatim.

The proxy relays each client command to the downstream MTA as it arrives and returns the
downstream's own reply, so per-recipient answers reach the client unchanged. smtplib does not fit:
it blocks (a thread per session), cannot read LMTP's one-reply-per-recipient answer to DATA, and
its dot-stuffing treats a bare LF as a line end, which would alter the body.

`DownstreamConnection` speaks the protocol; `RelaySession` is one client connection's transaction
downstream (open, start, add recipients, deliver or abort), reusing its connection between messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)

# MAIL FROM / RCPT TO parameters we take from clients, with the EHLO keyword downstream must have
# announced for us to pass them on (RFC 5321 §4.1.1.11: never send what was not announced).
PARAM_EXTENSION = {
    "SIZE": "SIZE",
    "BODY": "8BITMIME",
    "SMTPUTF8": "SMTPUTF8",
    "RET": "DSN",
    "ENVID": "DSN",
    "NOTIFY": "DSN",
    "ORCPT": "DSN",
    "AUTH": "AUTH",
}


# A CR or LF that is not part of a CRLF pair: downstreams differ on whether it ends a line, which is
# what SMTP smuggling exploits (`<LF>.<LF>` ends DATA for some and is message text for others).
_BARE_NEWLINE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
# Bytes written to the socket before waiting for it to drain: the message is never copied whole.
_SEND_CHUNK = 1 << 20


class DownstreamError(Exception):
    """Downstream unreachable, timed out, closed the connection or spoke garbage."""


class DownstreamProtocolError(DownstreamError):
    """Downstream said something out of turn (an unrequested reply, a non-354 go-ahead to DATA):
    its replies can no longer be matched to our commands, so the connection is dropped."""


@dataclass(frozen=True)
class Reply:
    """One SMTP reply: the code and its text lines (enhanced status code included, if any)."""

    code: int
    lines: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 400

    @property
    def text(self) -> str:
        return " ".join(self.lines)

    def render(self) -> str:
        """The reply as it goes on the wire (without the final CRLF), multi-line if it was."""
        lines = self.lines or ("",)
        head = [f"{self.code}-{line}" for line in lines[:-1]]
        return "\r\n".join([*head, f"{self.code} {lines[-1]}".rstrip()])


def crlf_lines(message: bytes) -> bytes:
    """`message` with every bare CR or LF made a CRLF; the same object when there is none."""
    return _BARE_NEWLINE.sub(b"\r\n", message) if _BARE_NEWLINE.search(message) else message


def dot_stuff(message: bytes) -> Iterator[bytes | memoryview]:
    """The message as DATA content, in pieces that share its memory: bare CR/LF made CRLF, leading
    dots doubled, CRLF-terminated, plus the final dot. Only CRLF ever ends a line on the wire."""
    message = crlf_lines(message)
    view = memoryview(message)
    if message.startswith(b"."):
        yield b"."
    start = 0
    while (found := message.find(b"\r\n.", start)) >= 0:
        yield view[start : found + 3]
        yield b"."
        start = found + 3
    yield view[start:]
    if message and not message.endswith(b"\r\n"):
        yield b"\r\n"
    yield b".\r\n"


def esmtp_params(options: Sequence[str], extensions: dict[str, str]) -> list[str]:
    """The client's MAIL FROM or RCPT TO parameters that downstream announced support for."""
    kept = []
    for option in options:
        keyword = option.partition("=")[0].upper()
        if PARAM_EXTENSION.get(keyword) in extensions:
            kept.append(option)
    return kept


def address(addr: str) -> str:
    """`<addr>` for the wire; aiosmtpd gives the null sender as `<>` already."""
    return addr if addr == "<>" else f"<{addr}>"


class DownstreamConnection:
    """One connection to the downstream MTA; every operation is bounded by `timeout` seconds."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self._reader = reader
        self._writer = writer
        self._timeout = timeout
        self.extensions: dict[str, str] = {}
        self.closed = False

    @classmethod
    async def open(
        cls, host: str, port: int, *, lmtp: bool, helo_name: str, timeout: float
    ) -> DownstreamConnection:
        """Connect and greet; any failure (including a non-2xx greeting) is a DownstreamError."""
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except (OSError, TimeoutError) as exc:
            raise DownstreamError(f"cannot connect to {host}:{port}: {exc or 'timeout'}") from exc
        conn = cls(reader, writer, timeout)
        try:
            greeting = await conn._read_reply()
            if greeting.code != 220:
                raise DownstreamError(f"downstream greeted with {greeting.render()!r}")
            hello = await conn.command(f"{'LHLO' if lmtp else 'EHLO'} {helo_name}")
            if hello.code != 250:
                raise DownstreamError(f"downstream refused {'LHLO' if lmtp else 'EHLO'}: {hello.render()!r}")
        except BaseException:  # also a cancellation: the client hung up while we were connecting
            conn.close()
            raise
        for line in hello.lines[1:]:
            keyword, _, value = line.partition(" ")
            conn.extensions[keyword.upper()] = value
        return conn

    async def mail(self, sender: str, options: list[str]) -> Reply:
        params = esmtp_params(options, self.extensions)
        return await self.command(" ".join([f"MAIL FROM:{address(sender)}", *params]))

    async def rcpt(self, recipient: str, options: Sequence[str] = ()) -> Reply:
        params = esmtp_params(options, self.extensions)
        return await self.command(" ".join([f"RCPT TO:{address(recipient)}", *params]))

    async def rset(self) -> Reply:
        return await self.command("RSET")

    async def data(self, message: bytes, replies: int) -> list[Reply]:
        """Send the message; `replies` is 1 for SMTP, the number of accepted recipients for LMTP.

        A refusal of DATA itself (4xx/5xx) is downstream's answer for the message; any other reply
        than 354 means nothing was sent and is a protocol error, never a delivery.
        """
        start = await self.command("DATA")
        if start.code >= 400:
            with contextlib.suppress(DownstreamError):  # if closed, the next message connects afresh
                await self.rset()  # end the transaction, so that the next MAIL is not a nested one
            return [start] * replies
        if start.code != 354:
            self.close()
            raise DownstreamProtocolError(f"downstream answered DATA with {start.render()!r}, not 354")
        batch: list[bytes | memoryview] = []
        size = 0
        for piece in dot_stuff(message):
            for offset in range(0, len(piece), _SEND_CHUNK):  # the transport copies what it buffers
                batch.append(piece[offset : offset + _SEND_CHUNK])
                size += len(batch[-1])
                if size >= _SEND_CHUNK:
                    await self._send(*batch)
                    batch, size = [], 0
        await self._send(*batch)
        answers = [await self._read_reply() for _ in range(replies)]
        self._check_in_step(closing_ok=True)
        return answers

    def quit(self) -> None:
        """Say goodbye without waiting for the reply: the client's QUIT must not hang on ours."""
        if not self.closed:
            self._writer.write(b"QUIT\r\n")
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._writer.close()

    async def command(self, line: str) -> Reply:
        self._check_in_step()
        await self._send(line.encode("utf-8", "surrogateescape") + b"\r\n")
        return await self._read_reply()

    def _check_in_step(self, closing_ok: bool = False) -> None:
        """Lock-step means downstream has nothing more to say before our next command; bytes
        waiting here are replies to commands we never sent (e.g. a smuggled second message).
        A 421 is an MTA timing out or shutting down (`closing_ok`: fine after a final reply)."""
        # StreamReader has no peek: its private buffer is the only way to see unread bytes.
        unread = bytes(self._reader._buffer[:80]) if not self.closed else b""  # type: ignore[attr-defined]
        if not unread or (closing_ok and unread.startswith(b"421")):
            return
        self.close()
        if unread.startswith(b"421"):
            raise DownstreamError(f"downstream closed the connection: {unread!r}")
        raise DownstreamProtocolError(f"downstream sent replies to commands we did not send: {unread!r}")

    async def _send(self, *pieces: bytes | memoryview) -> None:
        if self.closed:
            raise DownstreamError("downstream connection already closed")
        try:
            self._writer.writelines(pieces)
            async with asyncio.timeout(self._timeout):
                await self._writer.drain()
        except (OSError, TimeoutError) as exc:
            self.close()
            raise DownstreamError(f"sending to downstream failed: {exc or 'timeout'}") from exc

    async def _read_reply(self) -> Reply:
        lines: list[str] = []
        try:
            async with asyncio.timeout(self._timeout):
                while True:
                    raw = await self._reader.readline()
                    if not raw.endswith(b"\n"):
                        raise DownstreamError("downstream closed the connection")
                    line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
                    if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in ("", " ", "-"):
                        raise DownstreamError(f"malformed downstream reply {line[:80]!r}")
                    lines.append(line[4:])
                    if line[3:4] != "-":
                        return Reply(int(line[:3]), tuple(lines))
        except (OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as exc:
            self.close()
            raise DownstreamError(f"reading downstream reply failed: {exc or 'timeout'}") from exc
        except DownstreamError:
            self.close()
            raise


@dataclass(frozen=True)
class Downstream:
    """Where the proxy delivers: read from the config for each new connection, so a reload counts."""

    host: str
    port: int
    helo_name: str
    timeout: float

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self, lmtp: bool) -> DownstreamConnection:
        return await DownstreamConnection.open(
            self.host, self.port, lmtp=lmtp, helo_name=self.helo_name, timeout=self.timeout
        )


async def probe(
    target: Downstream, lmtp: bool, recipients: Sequence[str]
) -> tuple[dict[str, str], list[Reply]]:
    """Greet downstream as the proxy does and offer it each recipient (MAIL FROM:<>, RCPT TO, RSET).

    Returns its EHLO keywords and one answer per recipient, up to the first refusal;
    DownstreamError: downstream is unreachable.
    """
    connection = await target.connect(lmtp)
    answers: list[Reply] = []
    try:
        for recipient in recipients:
            start = await connection.mail("<>", [])
            answers.append(await connection.rcpt(recipient) if start.ok else start)
            await connection.rset()
            if not answers[-1].ok:
                break
    finally:
        connection.quit()
    return connection.extensions, answers


class Relay:
    """The proxy's way downstream, shared by its sessions: where to, the error counter, and what
    downstream announced last (for a client's EHLO before its session has a connection)."""

    def __init__(self, target: Callable[[], Downstream], errors: Counter[str]) -> None:
        self.target = target
        self.errors = errors
        self.extensions: dict[str, str] | None = None  # None: not known yet

    async def connect(self, lmtp: bool) -> DownstreamConnection:
        connection = await self.target().connect(lmtp)
        self.extensions = connection.extensions
        return connection


class RelaySession:
    """One client connection's side downstream: a connection opened on demand and kept for the
    client's next message, and the transaction on it, relayed command by command.

    An operation that loses the connection drops it (logged, counted) and raises DownstreamError;
    the next message opens a fresh one.
    """

    def __init__(self, relay: Relay, lmtp: bool) -> None:
        self.relay = relay
        self.lmtp = lmtp
        self.connection: DownstreamConnection | None = None
        # True while downstream holds a MAIL transaction the client may have abandoned (RSET,
        # EHLO, an oversize DATA refused before the handler ran): reset it before the next MAIL.
        self.open_transaction = False
        # The RCPT parameters (NOTIFY, ORCPT) of each accepted recipient, for split deliveries.
        self.rcpt_params: dict[str, list[str]] = {}
        self.gone = False  # the client hung up: a connection opened late is closed at once

    @property
    def live(self) -> bool:
        return self.connection is not None and not self.connection.closed

    async def extensions(self) -> dict[str, str]:
        """What downstream announces: on this session's connection, else the last one seen."""
        if self.connection is not None and not self.connection.closed:
            return self.connection.extensions
        if self.relay.extensions is None:
            try:
                await self.open()
            except DownstreamError as exc:
                self.drop(exc, None)
        return self.relay.extensions or {}

    async def open(self) -> DownstreamConnection:
        connection = await self.relay.connect(self.lmtp)
        if self.gone:
            connection.close()
            raise DownstreamError("the client hung up while we were connecting")
        self.connection = connection
        self.open_transaction = False
        return connection

    async def start(self, sender: str, options: list[str]) -> Reply:
        """MAIL FROM on the session's connection if it still works, else on a fresh one."""
        if self.connection is not None and not self.connection.closed:
            try:
                if self.open_transaction:
                    await self.connection.rset()
                    self.open_transaction = False
                return self._started(await self.connection.mail(sender, options))
            except DownstreamProtocolError as exc:  # unread replies: whatever they were, start afresh
                self.drop(exc)
            except DownstreamError as exc:  # e.g. downstream timed out the idle connection
                self.drop(exc, None)
        try:
            connection = await self.open()
            return self._started(await connection.mail(sender, options))
        except DownstreamError as exc:
            self.drop(exc)
            raise

    async def rcpt(self, recipient: str, options: list[str]) -> Reply:
        """RCPT TO in the transaction `start` opened."""
        connection = self._connection()
        try:
            reply = await connection.rcpt(recipient, options)
        except DownstreamError as exc:
            self.drop(exc)
            raise
        if reply.ok:
            self.rcpt_params[recipient] = options
        return self._closing(reply)

    async def restart(
        self, sender: str, options: list[str], recipients: Sequence[tuple[str, list[str]]]
    ) -> list[Reply]:
        """A transaction of its own for some recipients (with their RCPT parameters): the answer to
        MAIL FROM, then one per recipient if MAIL was accepted."""
        connection = self._connection()
        try:
            await connection.rset()
            answers = [await connection.mail(sender, options)]
            if answers[0].ok:
                self.open_transaction = True
                answers += [await connection.rcpt(address, params) for address, params in recipients]
        except DownstreamError as exc:
            self.drop(exc)
            raise
        return answers

    async def deliver(self, message: bytes, recipients: int) -> list[Reply]:
        """DATA: downstream's answer, one per accepted recipient in LMTP."""
        connection = self._connection()
        try:
            replies = await connection.data(message, recipients if self.lmtp else 1)
        except DownstreamError as exc:
            self.drop(exc)
            raise
        self.open_transaction = False
        return replies

    async def abort(self) -> None:
        """Cancel the transaction (the message is rejected or deferred by us)."""
        if self.connection is None:
            return
        try:
            await self.connection.rset()
            self.open_transaction = False
        except DownstreamError as exc:
            self.drop(exc)

    def quit(self) -> None:
        if self.connection is not None:
            self.connection.quit()
            self.connection = None

    def close(self) -> None:
        """The client is gone: drop downstream too, which aborts any unfinished transaction."""
        self.gone = True
        if self.connection is not None:
            self.connection.close()
            self.connection = None

    def drop(self, reason: object, kind: str | None = "downstream") -> None:
        """Forget the connection; `kind` counts as an error (None: routine, e.g. a stale one)."""
        address = self.relay.target().address
        log.log(logging.WARNING if kind else logging.DEBUG, "downstream %s: %s", address, reason)
        if kind:
            self.relay.errors[kind] += 1
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        self.open_transaction = False

    def _connection(self) -> DownstreamConnection:
        if self.connection is None:
            raise DownstreamError("no downstream connection (lost earlier)")
        return self.connection

    def _started(self, reply: Reply) -> Reply:
        if reply.ok:
            self.open_transaction = True
            self.rcpt_params = {}
        return self._closing(reply)

    def _closing(self, reply: Reply) -> Reply:
        """Downstream says 421, it is closing: the next transaction needs a fresh connection."""
        if reply.code == 421 and self.connection is not None:
            self.connection.close()
            self.connection = None
        return reply
