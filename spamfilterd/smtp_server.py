"""The proxy's SMTP and LMTP servers: aiosmtpd's protocol classes with the limits a proxy in front of
a real MTA needs, and the listener that owns their sessions.

aiosmtpd runs one protocol object per connection and hands the handler (`smtp.ProxyHandler`, one
for all connections) that connection's `Session`; ours carries the downstream transaction. Added
to aiosmtpd: a DATA reader that holds at most `smtp.max_message_size` bytes whatever the client
sends, a bound on the bytes in flight of all sessions together, an idle timer that only progress
re-arms, DSN and AUTH parameters passed through, enhanced status codes, a session limit and
draining on shutdown. Some of this overrides private aiosmtpd methods: pyproject.toml bounds
aiosmtpd below its next minor version.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
import time
import weakref
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any, AnyStr

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, Session

from spamfilterd.config import Config, split_host_port
from spamfilterd.relay import PARAM_EXTENSION, Downstream, DownstreamError, Relay, RelaySession, probe

if TYPE_CHECKING:
    from spamfilterd.batcher import Runtime
    from spamfilterd.http import Metrics

log = logging.getLogger(__name__)

TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_BUSY = "451 4.3.1 Too much mail in progress, try again later"

# aiosmtpd's own refusals lack the enhanced status code (RFC 3463) that clients and logs expect.
_ENHANCED = {
    "552 Error: message size exceeds fixed maximum message size": TOO_BIG,
    "500 Command line too long": "500 5.5.2 Command line too long",
    "500 Error: bad syntax": "500 5.5.2 Error: bad syntax",
    "503 Error: need RCPT command": "503 5.5.1 Error: need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Error: need MAIL command",
    "503 Error: nested MAIL command": "503 5.5.1 Error: nested MAIL command",
    "501 Syntax: DATA": "501 5.5.4 Syntax: DATA",
}
_DATA_TIMER_MARGIN_S = 5.0
_PROBE_TIMEOUT_S = 10.0


class QuarantineError(Exception):
    """Downstream refuses a `redirect` address of the rules: redirected mail could only be deferred."""


class ProxySession(Session):
    """aiosmtpd's per-connection state, plus ours: the transaction downstream and when DATA began."""

    def __init__(self, loop: asyncio.AbstractEventLoop, relay: RelaySession) -> None:
        super().__init__(loop)
        self.relay = relay
        # loop.time() when the client sent DATA: smtp.data_timeout bounds the whole DATA phase,
        # transfer plus filtering plus relaying, well inside a client's 10-minute final-reply wait.
        self.data_started = 0.0


class ProxySMTP(SMTP):
    """One client connection over SMTP; the handler answers MAIL, RCPT and the message."""

    lmtp = False
    # The stream reader's buffer limit, and thereby the largest piece of a line read at once.
    # Longer lines are read in pieces: any line length is accepted up to max_message_size, as
    # mail that an MTA has already accepted must not bounce here for its shape.
    line_length_limit = 65_536
    # DSN parameters (ORCPT, ENVID) lengthen MAIL and RCPT beyond 512 bytes (RFC 3461 §5).
    command_size_limit = 2048

    def __init__(self, proxy: SmtpProxy, handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.proxy = proxy
        # Per connection: aiosmtpd keeps these limits in a class-wide dict that EHLO keeps growing.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self._raw_arg = ""  # the last MAIL or RCPT argument as the client sent it
        self._progress_at = self.loop.time()
        self._held = 0  # bytes of this connection's message counted in proxy.bytes_in_flight

    def _create_session(self) -> ProxySession:
        return ProxySession(self.loop, RelaySession(self.proxy.relay, self.lmtp))

    def proxy_session(self) -> ProxySession:
        """The session (a method, not a property: aiosmtpd inspects its members before it exists)."""
        assert isinstance(self.session, ProxySession)  # made in connection_made, before any command
        return self.session

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        """Let DSN and AUTH parameters through: Postfix's before-queue proxy forwards the client's
        MAIL/RCPT commands verbatim, and aiosmtpd alone would refuse them with 555."""
        result = super()._getparams(params)
        if result is not None:
            for keyword in PARAM_EXTENSION.keys() - {"SIZE", "BODY", "SMTPUTF8"}:
                result.pop(keyword, None)
        return result

    def original_params(self, options: list[str]) -> list[str]:
        """aiosmtpd upper-cases parameters; ENVID and ORCPT values must travel unchanged."""
        return self._raw_arg.split()[-len(options) :] if options else []

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._raw_arg = arg or ""
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._raw_arg = arg or ""
        assert self.envelope is not None  # made in connection_made and after each message
        before = len(self.envelope.rcpt_tos)
        await super().smtp_RCPT(arg)
        if self.envelope is not None and len(self.envelope.rcpt_tos) > before:
            self._progress()

    def _progress(self) -> None:
        self._progress_at = self.loop.time()
        self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms the idle timer on every command, so NOOP or RSET would hold a session
        forever: only progress (the greeting, an accepted RCPT, a message) earns command_timeout."""
        if duration is None:
            left = self._progress_at + self._timeout_duration - self.loop.time()
            duration = max(0.01, left)
        super()._reset_timeout(duration)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            status = _ENHANCED.get(status, status)
        await super().push(status)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.proxy_session().relay.close()
        self._release()
        self.proxy.session_closed(self)

    def idle(self) -> bool:
        """No mail transaction open: closing now loses nothing."""
        return self.envelope is None or self.envelope.mail_from is None

    def shut_down(self) -> None:
        """RFC 5321 §3.8: tell the client with a 421 before closing the channel."""
        transport = self.transport
        if isinstance(transport, asyncio.WriteTransport) and not transport.is_closing():
            transport.write(SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        """RFC 5321 §4.1.1.4, with bounded memory; the handler answers the message."""
        if await self.check_helo_needed():
            return
        envelope = self.envelope
        assert envelope is not None  # made in connection_made and after each message
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # aiosmtpd does not re-arm its idle timer while message lines arrive: arm it for the whole
        # DATA phase (a stalled transfer is cut without a reply, so the client retries), a little
        # after the handler's own deadline so that one answers 451 first.
        self.proxy_session().data_started = self.loop.time()
        data_timeout = self.proxy.runtime.config.smtp.data_timeout
        margin = min(_DATA_TIMER_MARGIN_S, max(1.0, data_timeout / 10))
        self._reset_timeout(data_timeout + margin)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            content, reply = await self._receive()
            if reply is None:
                envelope.content = envelope.original_content = content
                del content
                reply = await self._call_handler_hook("DATA")
            self._set_post_data_state()
            self._progress_at = self.loop.time()
            self._release()  # the message is relayed or refused: before the reply, for a new one
            await self.push(reply)
        finally:
            self._release()
            if self.transport is not None:
                self._reset_timeout()
        if self.proxy.draining:
            self.shut_down()

    async def _receive(self) -> tuple[bytes, str | None]:
        """The message up to the lone dot, dot-transparency undone (RFC 5321 §4.5.2); or, with the
        rest read and thrown away, why it is refused. Only CRLF ends a line here: a bare LF or CR
        is message text (the relay makes it CRLF), so `<LF>.<LF>` cannot end the message."""
        limit = self.data_size_limit
        reader = self._reader
        content = bytearray()
        refusal: str | None = None
        at_line_start = True
        while True:
            try:
                piece = await reader.readuntil(b"\r\n")
                whole = True
            except asyncio.LimitOverrunError as exc:  # a long line: take what is there, read on
                piece = await reader.read(exc.consumed)
                whole = False
            if at_line_start and piece[:1] == b".":
                if whole and piece == b".\r\n":
                    break
                piece = piece[1:]
            at_line_start = whole
            if refusal is not None:
                continue
            if limit and len(content) + len(piece) > limit:
                refusal = TOO_BIG
            elif not self._hold(len(piece)):
                refusal = TOO_BUSY
            else:
                content += piece
                continue
            content = bytearray()  # from here on, only the end of the message is looked for
            self._release()
        return bytes(content), refusal

    def _hold(self, size: int) -> bool:
        """Count `size` more bytes of this connection's message in flight, if the limit allows."""
        if self.proxy.bytes_in_flight + size > self.proxy.runtime.config.smtp.max_bytes_in_flight:
            return False
        self.proxy.bytes_in_flight += size
        self._held += size
        return True

    def _release(self) -> None:
        self.proxy.bytes_in_flight -= self._held
        self._held = 0

    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)
        if self.proxy.draining:
            self.shut_down()


class ProxyLMTP(ProxySMTP, LMTP):
    """One client connection over LMTP: LHLO, and one reply per recipient to the message."""

    lmtp = True


class _Refuse(asyncio.Protocol):
    """Answers a connection over `max_sessions` (or during shutdown) and hangs up at once."""

    def __init__(self, reply: str):
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            transport.write(self.reply.encode() + b"\r\n")
        transport.close()


class SmtpProxy:
    """The listening socket and its connections; `runtime` is swapped whole on reload."""

    def __init__(self, runtime: Runtime, metrics: Metrics, handler: Any, hostname: str | None = None):
        self.runtime = runtime
        self.metrics = metrics
        self.handler = handler
        # Resolved once: aiosmtpd would otherwise call socket.getfqdn() (DNS) on every connection.
        self.hostname = hostname or socket.gethostname()
        self.draining = False
        self.bytes_in_flight = 0  # bytes of messages being received or checked, all connections
        self.relay = Relay(self.downstream, metrics.errors)
        self._servers: weakref.WeakSet[ProxySMTP] = weakref.WeakSet()
        self._server: asyncio.Server | None = None

    def downstream(self, config: Config | None = None) -> Downstream:
        """Where to deliver, per `config` (default: the one serving now)."""
        smtp = (config or self.runtime.config).smtp
        host, port = split_host_port(smtp.downstream)
        return Downstream(host, port, self.hostname, smtp.downstream_timeout)

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0 = any free port); returns the bound address."""
        self._server = await asyncio.get_running_loop().create_server(
            self._new_connection, host, port, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[:2]

    async def verify(self, config: Config) -> None:
        """Greet downstream for `config` as the proxy does and offer it each `redirect` address, so
        that a quarantine it does not know stops a start or a reload instead of deferring spam for
        days; QuarantineError if one is refused. Downstream being down only warns: it may start after us."""
        smtp = config.smtp
        redirects = [rule for rule in config.rules if "redirect" in rule.actions and rule.redirect_to]
        # A silent downstream must not stall a start.
        target = replace(self.downstream(config), timeout=min(smtp.downstream_timeout, _PROBE_TIMEOUT_S))
        try:
            extensions, answers = await probe(
                target, smtp.protocol == "lmtp", [rule.redirect_to or "" for rule in redirects]
            )
        except DownstreamError as exc:
            log.warning(
                "cannot check downstream %s now (%s); redirect addresses unverified", smtp.downstream, exc
            )
            return
        for rule, reply in zip(redirects, answers, strict=False):
            if not reply.ok:
                raise QuarantineError(
                    f"rules: {rule.name}: downstream {smtp.downstream} refuses the redirect address "
                    f"{rule.redirect_to}: {reply.code} {reply.text} (make it a mailbox downstream "
                    "delivers to; a Postfix reinjection smtpd must not have no_unknown_recipient_checks)"
                )
        self.relay.extensions = extensions

    def swap(self, runtime: Runtime) -> Runtime:
        """Serve new messages with `runtime`; messages already being checked finish on the old one."""
        old, self.runtime = self.runtime, runtime
        return old

    @property
    def sessions(self) -> int:
        return len(self._servers)

    def session_closed(self, server: ProxySMTP) -> None:
        self._servers.discard(server)
        self.metrics.sessions = len(self._servers)

    async def shutdown(self, grace: float) -> bool:
        """Stop listening, close idle sessions, let open transactions finish for up to `grace` s.

        Returns False when sessions had to be cut: their clients got no final reply, so they
        keep the message and retry. Nothing that was answered 250 is ever lost.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        for server in list(self._servers):
            if server.idle():
                server.shut_down()
        deadline = time.monotonic() + grace
        while self._servers and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self._servers)
        for server in leftover:
            if isinstance(server.transport, asyncio.WriteTransport):
                server.transport.abort()
        await asyncio.sleep(0)
        return not leftover

    def _new_connection(self) -> asyncio.Protocol:
        smtp = self.runtime.config.smtp
        if self.draining:
            return _Refuse(SHUTTING_DOWN)
        if len(self._servers) >= smtp.max_sessions:
            self.metrics.sessions_refused += 1
            return _Refuse(TOO_MANY_SESSIONS)
        lmtp = smtp.protocol == "lmtp"
        server = (ProxyLMTP if lmtp else ProxySMTP)(
            self,
            self.handler,
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident=f"{'LMTP' if lmtp else 'ESMTP'} spamfilterd",
            timeout=smtp.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self._servers.add(server)
        self.metrics.sessions = len(self._servers)
        return server
