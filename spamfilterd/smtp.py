"""The SMTP/LMTP proxy: aiosmtpd faces the client, the downstream MTA sits behind, the filter between.

Commands are relayed in lock-step, like spampd does: MAIL FROM and each RCPT TO go to downstream
as they arrive and downstream's own reply goes back to the client, so every recipient gets the
downstream's real per-recipient answer and the client keeps what downstream would not take. The
end of DATA is answered only after downstream answered the message (one reply per recipient in
LMTP). Anything that goes wrong on our side is a 4xx: the sender keeps the message and retries.
`protocol: lmtp` means LMTP on both sides (e.g. Postfix `lmtp:` → spamfilterd → Dovecot LMTP).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import socket
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP

from spamfilterd.batcher import Batcher, ClassifierError
from spamfilterd.config import Config, split_host_port
from spamfilterd.relay import (
    PARAM_EXTENSION,
    DownstreamConnection,
    DownstreamError,
    DownstreamProtocolError,
    Reply,
)
from spamfilterd.rules import Envelope, recipient_policy, refusing

if TYPE_CHECKING:
    from spamfilterd.engine import Delivery, FilterEngine
    from spamfilterd.http import Metrics

log = logging.getLogger(__name__)

DOWNSTREAM_DOWN = "451 4.4.1 Downstream mail server unavailable, try again later"
DOWNSTREAM_LOST = "451 4.4.2 Lost the downstream mail server, try again later"
DEADLINE = "451 4.4.2 Filtering took too long, try again later"
CLASSIFIER_DOWN = "451 4.7.1 Spam filter unavailable, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
OTHER_POLICY = "452 4.5.3 Recipient has another filter policy, send it in a separate transaction"
TOO_MANY_SESSIONS = "421 4.7.0 Too many connections, try again later"
SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size"
TOO_BUSY = "451 4.3.1 Too much mail in progress, try again later"
BAD_SENDER = "553 5.1.7 Sender address is not valid UTF-8"
BAD_RECIPIENT = "553 5.1.3 Recipient address is not valid UTF-8"

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
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:[ \t]*(.*(?:\r?\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)
_DATA_TIMER_MARGIN_S = 5.0
_PROBE_TIMEOUT_S = 10.0
_LOGFMT_BARE = re.compile(r"[^\s\"=\\]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Runtime:
    """What a SIGHUP swaps in one assignment: config, the engine (model) and its batcher."""

    config: Config
    engine: FilterEngine
    batcher: Batcher


class QuarantineError(Exception):
    """Downstream refuses a `redirect` address of the rules: redirected mail could only be deferred."""


async def probe_downstream(config: Config, hostname: str) -> dict[str, str]:
    """Greet downstream as the proxy does and offer it each `redirect` address (MAIL FROM:<>,
    RCPT TO, RSET), so that a quarantine it does not know stops a start or a reload instead of
    deferring spam for days; returns downstream's EHLO keywords. DownstreamError: unreachable."""
    smtp = config.smtp
    host, port = split_host_port(smtp.downstream)
    timeout = min(smtp.downstream_timeout, _PROBE_TIMEOUT_S)  # a silent downstream must not stall a start
    conn = await DownstreamConnection.open(
        host, port, lmtp=smtp.protocol == "lmtp", helo_name=hostname, timeout=timeout
    )
    try:
        for rule in config.rules:
            if "redirect" not in rule.actions or not rule.redirect_to:
                continue
            start = await conn.mail("<>", [])
            reply = await conn.rcpt(rule.redirect_to) if start.ok else start
            await conn.rset()
            if not reply.ok:
                raise QuarantineError(
                    f"rules: {rule.name}: downstream {smtp.downstream} refuses the redirect address "
                    f"{rule.redirect_to}: {reply.code} {reply.text} (make it a mailbox downstream "
                    "delivers to; a Postfix reinjection smtpd must not have no_unknown_recipient_checks)"
                )
    finally:
        conn.quit()
    return conn.extensions


def build_runtime(
    config: Config, metrics: Metrics | None = None, engine: FilterEngine | None = None
) -> Runtime:
    """Load the model named by `config` unless `engine` is given (slow: in a thread once serving)."""
    if engine is None:
        from spamfilterd.engine import FilterEngine

        engine = FilterEngine.from_config(config)
    batcher = Batcher(
        engine,
        batch_size=config.model.batch_size,
        wait_ms=config.smtp.batch_wait_ms,
        workers=config.smtp.workers,
        timeout=config.smtp.classify_timeout,
        on_batch=metrics.observe_batch if metrics is not None else None,
    )
    return Runtime(config, engine, batcher)


@dataclass
class Outcome:
    """The fate of one message, for the client's reply, the log line and the metrics."""

    verdict: str
    score: float | None
    actions: tuple[str, ...]
    rule: str
    action: str  # delivered | redirected | rejected | tempfailed | refused | deferred | partial
    replies: list[str]
    error: str | None = None


def logfmt(fields: dict[str, Any]) -> str:
    """`key=value` pairs, values quoted where needed, so grep and log shippers both cope."""
    parts = []
    for key, value in fields.items():
        text = _CONTROL.sub(" ", "" if value is None else str(value))  # one line, always
        if not _LOGFMT_BARE.fullmatch(text):
            text = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
        parts.append(f"{key}={text}")
    return " ".join(parts)


def message_id(raw: bytes) -> str:
    """The Message-ID header (first one, unfolded, printable only) or "-" without one."""
    head_end = raw.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(raw if head_end < 0 else raw[: head_end + 2])
    if not match:
        return "-"
    value = re.sub(rb"\s+", b" ", match.group(1)).strip().decode("ascii", "replace")
    return "".join(c if c.isprintable() else "?" for c in value)[:200] or "-"


def _passable(reply: Reply) -> Reply:
    """A downstream 421 would tell our client that *we* are closing: make it a plain 451."""
    return Reply(451, reply.lines) if reply.code == 421 else reply


def _ours(reply: str) -> Reply:
    code, _, text = reply.partition(" ")
    return Reply(int(code), (text,))


def _action(replies: list[Reply], success: str) -> str:
    if all(r.ok for r in replies):
        return success
    if all(r.code >= 500 for r in replies):
        return "refused"
    return "partial" if any(r.ok for r in replies) else "deferred"


def _one_reply(replies: list[Reply]) -> Reply:
    """SMTP has one reply to DATA for all recipients: success if all succeeded, else a failure,
    a temporary one first (the sender retries; a copy already delivered may then arrive twice,
    never none)."""
    failed = [r for r in replies if not r.ok]
    if not failed:
        return replies[0]
    return next((r for r in failed if r.code < 500), failed[0])


def _utf8(address: str) -> bool:
    """aiosmtpd keeps undecodable bytes as surrogates; they have no place in an address or header."""
    try:
        address.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ProxyHandler:
    """aiosmtpd hooks for one client connection; owns that connection's downstream connection."""

    def __init__(self, proxy: SmtpProxy, lmtp: bool):
        self.proxy = proxy
        self.lmtp = lmtp
        self.downstream: DownstreamConnection | None = None
        # True while downstream holds a MAIL transaction the client may have abandoned (RSET,
        # EHLO, an oversize DATA refused before the handler ran): reset it before the next MAIL.
        self.open_transaction = False
        # The RCPT parameters (NOTIFY, ORCPT) of each accepted recipient, for split deliveries.
        self.rcpt_params: dict[str, list[str]] = {}
        # loop.time() when the client sent DATA: smtp.data_timeout bounds the whole DATA phase,
        # transfer plus filtering plus relaying, well inside a client's 10-minute final-reply wait.
        self.data_started = 0.0
        self.gone = False  # the client hung up: a downstream connection opened late is closed

    async def handle_EHLO(self, server, session, envelope, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING"]
        if "DSN" in await self._downstream_extensions():
            extra.append("250-DSN")  # downstream does DSN: NOTIFY/ORCPT/ENVID/RET pass through
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(self, server, session, envelope, address: str, mail_options: list[str]) -> str:
        if self.proxy.draining:
            asyncio.get_running_loop().call_soon(server.transport.close)
            return SHUTTING_DOWN
        if not _utf8(address):
            return BAD_SENDER
        mail_options = server.original_params(mail_options)
        try:
            reply = await self._start_transaction(address, mail_options)
        except DownstreamError as exc:
            self._drop(exc)
            return DOWNSTREAM_DOWN
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            self.open_transaction = True
            self.rcpt_params = {}
        return self._reply(reply)

    async def handle_RCPT(self, server, session, envelope, address: str, rcpt_options: list[str]) -> str:
        config = self.proxy.runtime.config
        if len(envelope.rcpt_tos) >= config.smtp.max_recipients:
            return TOO_MANY_RECIPIENTS
        if not _utf8(address):
            return BAD_RECIPIENT
        if not self.lmtp and envelope.rcpt_tos and not self._same_policy(address, envelope.rcpt_tos[0]):
            return OTHER_POLICY
        if self.downstream is None:
            return DOWNSTREAM_LOST
        rcpt_options = server.original_params(rcpt_options)
        try:
            reply = await self.downstream.rcpt(address, rcpt_options)
        except DownstreamError as exc:
            self._drop(exc)
            return DOWNSTREAM_LOST
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            self.rcpt_params[address] = rcpt_options
        return self._reply(reply)

    def _same_policy(self, address: str, first: str) -> bool:
        """One SMTP reply must answer every recipient: those whom the rules may answer differently
        (postmaster and a rejecting rule, say) go in transactions of their own."""
        rules = self.proxy.runtime.config.rules
        return not refusing(rules) or recipient_policy(rules, address) == recipient_policy(rules, first)

    async def handle_DATA(self, server, session, envelope) -> str:
        started = time.monotonic()
        runtime = self.proxy.runtime
        raw: bytes = envelope.original_content or b""
        envelope.content = envelope.original_content = None  # one reference less to a large object
        recipients = tuple(envelope.rcpt_tos)
        logged = {"message_id": message_id(raw), "size": len(raw)}
        work = self._filter_and_relay(runtime, envelope.mail_from, envelope.mail_options, recipients, raw)
        del raw  # `work` holds the only reference, and drops it once the message is checked
        try:
            async with asyncio.timeout_at(self.data_started + runtime.config.smtp.data_timeout):
                outcome = await work
        except TimeoutError:
            self._drop("per-message deadline (smtp.data_timeout) exceeded", "deadline")
            outcome = Outcome("unknown", None, (), "-", "deferred", [DEADLINE], "deadline")
        self.open_transaction = False
        self._record(runtime, outcome, envelope.mail_from, recipients, logged, time.monotonic() - started)
        replies = outcome.replies
        if self.lmtp and len(replies) != len(recipients):
            replies = replies[:1] * len(recipients)
        return "\r\n".join(replies if self.lmtp else replies[:1])

    async def handle_QUIT(self, server, session, envelope) -> str:
        if self.downstream is not None:
            self.downstream.quit()
            self.downstream = None
        return "221 2.0.0 Bye"

    def close(self) -> None:
        """The client is gone: drop downstream too, which aborts any unfinished transaction."""
        self.gone = True
        if self.downstream is not None:
            self.downstream.close()
            self.downstream = None

    async def _downstream_extensions(self) -> dict[str, str]:
        """What downstream announced to us: on this session's connection, else the last one seen."""
        if self.downstream is not None and not self.downstream.closed:
            return self.downstream.extensions
        if self.proxy.downstream_extensions is None:
            try:
                await self._connect()
            except DownstreamError as exc:
                self._drop(exc, None)
        return self.proxy.downstream_extensions or {}

    async def _connect(self) -> None:
        smtp = self.proxy.runtime.config.smtp
        host, port = split_host_port(smtp.downstream)
        downstream = await DownstreamConnection.open(
            host, port, lmtp=self.lmtp, helo_name=self.proxy.hostname, timeout=smtp.downstream_timeout
        )
        if self.gone:  # the client hung up while we were connecting
            downstream.close()
            raise DownstreamError("the client hung up while we were connecting")
        self.downstream = downstream
        self.open_transaction = False
        self.proxy.downstream_extensions = downstream.extensions

    async def _start_transaction(self, address: str, options: list[str]) -> Reply:
        """MAIL FROM downstream, on the session's connection if it still works, else a fresh one."""
        if self.downstream is not None and not self.downstream.closed:
            try:
                if self.open_transaction:
                    await self.downstream.rset()
                    self.open_transaction = False
                return await self.downstream.mail(address, options)
            except DownstreamProtocolError as exc:  # unread replies: whatever they were, start afresh
                self._drop(exc)
            except DownstreamError as exc:  # e.g. downstream timed out the idle connection
                self._drop(exc, None)
        await self._connect()
        assert self.downstream is not None
        return await self.downstream.mail(address, options)

    async def _filter_and_relay(
        self, runtime: Runtime, sender: str, options: list[str], recipients: tuple[str, ...], raw: bytes
    ) -> Outcome:
        if self.downstream is None or self.downstream.closed:
            return Outcome("unknown", None, (), "-", "deferred", [DOWNSTREAM_LOST], "downstream")
        envelope = Envelope(mail_from="" if sender == "<>" else sender, rcpt_tos=recipients)
        try:
            result = await runtime.batcher.check(raw, envelope)
        except ClassifierError as exc:
            log.warning("classifier error: %s", exc)
            if runtime.config.smtp.on_classifier_error == "tempfail":
                await self._abort()
                return Outcome("unchecked", None, (), "-", "tempfailed", [CLASSIFIER_DOWN], "classifier")
            message = await runtime.batcher.unchecked(raw)
            outcome = Outcome("unchecked", None, ("accept",), "-", "delivered", [], "classifier")
            return await self._deliver(outcome, message, len(recipients))
        del raw  # the tagged copies below are all that is relayed
        first = result.decision
        deliveries = result.deliveries
        outcome = Outcome(
            first.verdict,
            first.score,
            tuple(dict.fromkeys(a for d in deliveries for a in d.decision.actions)),
            ",".join(d.decision.rule for d in deliveries),
            "",
            [],
        )
        if len(deliveries) == 1:
            return await self._apply(outcome, deliveries[0], sender, options, len(recipients))
        return await self._split(outcome, deliveries, sender, options, recipients)

    async def _apply(
        self, outcome: Outcome, delivery: Delivery, sender: str, options: list[str], count: int
    ) -> Outcome:
        """One decision for every recipient: act on the transaction opened during RCPT."""
        decision = delivery.decision
        if "reject" in decision.actions:
            await self._abort()
            outcome.action, outcome.replies = "rejected", [f"554 5.7.1 {decision.reject_text}"]
            return outcome
        if "tempfail" in decision.actions:
            await self._abort()
            outcome.action, outcome.replies = "tempfailed", [f"451 4.7.1 {decision.tempfail_text}"]
            return outcome
        if "redirect" in decision.actions and decision.redirect_to:
            return await self._redirect(outcome, sender, options, decision.redirect_to, delivery.message)
        return await self._deliver(outcome, delivery.message, count)

    async def _split(
        self,
        outcome: Outcome,
        deliveries: list[Delivery],
        sender: str,
        options: list[str],
        recipients: tuple[str, ...],
    ) -> Outcome:
        """Recipients with different decisions: one downstream transaction per decision, as amavis
        does; each recipient gets the answer of its own transaction (LMTP), or all share one (SMTP)."""
        await self._abort()  # the transaction opened during RCPT had everyone in it
        answers: dict[str, Reply] = {}
        actions = []
        for delivery in deliveries:
            part = Outcome(outcome.verdict, outcome.score, delivery.decision.actions, "", "", [])
            if self.downstream is None:
                part.action, part.replies, outcome.error = "deferred", [DOWNSTREAM_LOST], "downstream"
            else:
                part = await self._group(part, delivery, sender, options)
            outcome.error = outcome.error or part.error
            actions.append(part.action)
            replies = [_ours(r) for r in part.replies]
            for i, rcpt in enumerate(delivery.recipients):
                answers[rcpt] = replies[min(i, len(replies) - 1)]
        outcome.action = actions[0] if len(set(actions)) == 1 else "split"
        replies = [answers[rcpt] for rcpt in recipients]
        outcome.replies = [r.render() for r in (replies if self.lmtp else [_one_reply(replies)])]
        return outcome

    async def _group(self, outcome: Outcome, delivery: Delivery, sender: str, options: list[str]) -> Outcome:
        """Deliver (or refuse) one group of recipients in a transaction of its own."""
        decision = delivery.decision
        if "reject" in decision.actions or "tempfail" in decision.actions:
            return await self._apply(outcome, delivery, sender, options, len(delivery.recipients))
        if "redirect" in decision.actions and decision.redirect_to:
            return await self._redirect(outcome, sender, options, decision.redirect_to, delivery.message)
        assert self.downstream is not None
        try:
            await self.downstream.rset()
            start = await self.downstream.mail(sender, options)
            if not start.ok:
                outcome.action, outcome.replies = _action([start], ""), [_passable(start).render()]
                return outcome
            self.open_transaction = True
            answers = [
                await self.downstream.rcpt(r, self.rcpt_params.get(r, [])) for r in delivery.recipients
            ]
        except DownstreamError as exc:
            self._drop(exc)
            outcome.action, outcome.replies, outcome.error = "deferred", [DOWNSTREAM_LOST], "downstream"
            return outcome
        accepted = [i for i, reply in enumerate(answers) if reply.ok]
        if accepted:
            sent = await self._deliver(outcome, delivery.message, len(accepted))
            data = [_ours(r) for r in sent.replies]
            for n, i in enumerate(accepted):
                answers[i] = data[min(n, len(data) - 1)]
        answers = [_passable(r) for r in answers]
        outcome.action = _action(answers, "delivered")
        outcome.replies = [r.render() for r in answers]
        return outcome

    async def _deliver(self, outcome: Outcome, message: bytes, recipients: int) -> Outcome:
        assert self.downstream is not None
        try:
            replies = await self.downstream.data(message, recipients if self.lmtp else 1)
        except DownstreamError as exc:
            self._drop(exc)
            outcome.action, outcome.replies, outcome.error = "deferred", [DOWNSTREAM_LOST], "downstream"
            return outcome
        self.open_transaction = False
        replies = [_passable(r) for r in replies]
        outcome.action = _action(replies, "delivered")
        outcome.replies = [r.render() for r in replies]
        return outcome

    async def _redirect(
        self, outcome: Outcome, sender: str, options: list[str], quarantine: str, message: bytes
    ) -> Outcome:
        """A new downstream transaction to the quarantine address only; its answer is everyone's."""
        assert self.downstream is not None
        try:
            await self.downstream.rset()
            setup = [await self.downstream.mail(sender, options)]
            if setup[0].ok:
                setup.append(await self.downstream.rcpt(quarantine))
        except DownstreamError as exc:
            self._drop(exc)
            outcome.action, outcome.replies, outcome.error = "deferred", [DOWNSTREAM_LOST], "downstream"
            return outcome
        if not setup[-1].ok:
            # Our quarantine setting is at fault, not the sender: defer, never bounce.
            await self._abort()
            outcome.action, outcome.error = "deferred", "quarantine"
            outcome.replies = [f"451 4.3.5 Quarantine delivery refused: {setup[-1].code} {setup[-1].text}"]
            return outcome
        outcome = await self._deliver(outcome, message, 1)
        if outcome.action == "delivered":
            outcome.action = "redirected"
        return outcome

    async def _abort(self) -> None:
        """Cancel the downstream transaction (the message is rejected or deferred by us)."""
        if self.downstream is None:
            return
        try:
            await self.downstream.rset()
            self.open_transaction = False
        except DownstreamError as exc:
            self._drop(exc)

    def _drop(self, reason: object, kind: str | None = "downstream") -> None:
        """Forget the downstream connection; `kind` counts as an error (None: routine, e.g. stale)."""
        downstream = self.proxy.runtime.config.smtp.downstream
        log.log(logging.WARNING if kind else logging.DEBUG, "downstream %s: %s", downstream, reason)
        if kind:
            self.proxy.metrics.errors[kind] += 1
        if self.downstream is not None:
            self.downstream.close()
            self.downstream = None
        self.open_transaction = False

    def _reply(self, reply: Reply) -> str:
        if reply.code == 421 and self.downstream is not None:
            self.downstream.close()
            self.downstream = None
        return _passable(reply).render()

    def _record(
        self,
        runtime: Runtime,
        outcome: Outcome,
        sender: str,
        recipients: tuple,
        logged: dict[str, Any],
        seconds: float,
    ) -> None:
        """One log line and the metrics for a message; never any of its content."""
        if outcome.error in ("classifier", "quarantine"):  # downstream/deadline: counted in _drop
            self.proxy.metrics.errors[outcome.error] += 1
        self.proxy.metrics.observe_message(outcome.verdict, outcome.action, seconds)
        fields = {
            "message_id": logged["message_id"],
            "from": sender,
            "rcpts": len(recipients),
            "size": logged["size"],
            "verdict": outcome.verdict,
            "score": "-" if outcome.score is None else f"{outcome.score:.3f}",
            "actions": ",".join(outcome.actions) or "-",
            "rule": outcome.rule,
            "action": outcome.action,
            "reply": outcome.replies[0] if outcome.replies else "-",
            "ms": round(seconds * 1000),
            "model": runtime.engine.model_id,
        }
        log.info(logfmt(fields), extra={"fields": fields})


class _ProxySession:
    """What our SMTP and LMTP sessions add to aiosmtpd: session limits, draining, enhanced codes,
    and a DATA reader that holds at most `smtp.max_message_size` bytes whatever the client sends."""

    # The stream reader's buffer limit, and thereby the largest piece of a line read at once.
    # Longer lines are read in pieces: any line length is accepted up to max_message_size, as
    # mail that an MTA has already accepted must not bounce here for its shape.
    line_length_limit = 65_536
    # DSN parameters (ORCPT, ENVID) lengthen MAIL and RCPT beyond 512 bytes (RFC 3461 §5).
    command_size_limit = 2048
    _raw_arg = ""

    def __init__(self, proxy: SmtpProxy, handler: ProxyHandler, **kwargs: Any):
        super().__init__(handler, **kwargs)  # type: ignore[call-arg]
        self.proxy = proxy
        # Per session: aiosmtpd keeps these limits in a class-wide dict that EHLO keeps growing.
        self.command_size_limits = collections.defaultdict(lambda: self.command_size_limit)
        self._progress_at = self.loop.time()  # type: ignore[attr-defined]
        self._held = 0  # bytes of this session's message counted in proxy.bytes_in_flight

    def _getparams(self, params: list[str]) -> dict[str, str | bool] | None:
        """Let DSN and AUTH parameters through: Postfix's before-queue proxy forwards the client's
        MAIL/RCPT commands verbatim, and aiosmtpd alone would refuse them with 555."""
        result = super()._getparams(params)  # type: ignore[misc]
        if result is not None:
            for keyword in PARAM_EXTENSION.keys() - {"SIZE", "BODY", "SMTPUTF8"}:
                result.pop(keyword, None)
        return result

    def original_params(self, options: list[str]) -> list[str]:
        """aiosmtpd upper-cases parameters; ENVID and ORCPT values must travel unchanged."""
        return self._raw_arg.split()[-len(options) :] if options else []

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._raw_arg = arg or ""
        await super().smtp_MAIL(arg)  # type: ignore[misc]

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._raw_arg = arg or ""
        before = len(self.envelope.rcpt_tos)  # type: ignore[attr-defined]
        await super().smtp_RCPT(arg)  # type: ignore[misc]
        if self.envelope is not None and len(self.envelope.rcpt_tos) > before:  # type: ignore[attr-defined]
            self._progress()

    def _progress(self) -> None:
        self._progress_at = self.loop.time()  # type: ignore[attr-defined]
        self._reset_timeout()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms the idle timer on every command, so NOOP or RSET would hold a session
        forever: only progress (the greeting, an accepted RCPT, a message) earns command_timeout."""
        if duration is None:
            left = self._progress_at + self._timeout_duration - self.loop.time()  # type: ignore[attr-defined]
            duration = max(0.01, left)
        super()._reset_timeout(duration)  # type: ignore[misc]

    async def push(self, status: str | bytes) -> None:
        if isinstance(status, str):
            status = _ENHANCED.get(status, status)
        await super().push(status)  # type: ignore[misc]

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)  # type: ignore[misc]
        self.event_handler.close()  # type: ignore[attr-defined]
        self._release()
        self.proxy.session_closed(self)

    def idle(self) -> bool:
        """No mail transaction open: closing now loses nothing."""
        envelope = self.envelope  # type: ignore[attr-defined]
        return envelope is None or envelope.mail_from is None

    def shut_down(self) -> None:
        """RFC 5321 §3.8: tell the client with a 421 before closing the channel."""
        transport = self.transport  # type: ignore[attr-defined]
        if transport is not None and not transport.is_closing():
            transport.write(SHUTTING_DOWN.encode() + b"\r\n")
            transport.close()

    async def smtp_DATA(self, arg: str) -> None:
        """RFC 5321 §4.1.1.4, with bounded memory; the handler answers the message."""
        if await self.check_helo_needed():  # type: ignore[attr-defined]
            return
        envelope = self.envelope  # type: ignore[attr-defined]
        if not envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        # aiosmtpd does not re-arm its idle timer while message lines arrive: arm it for the whole
        # DATA phase (a stalled transfer is cut without a reply, so the client retries), a little
        # after the handler's own deadline so that one answers 451 first.
        self.event_handler.data_started = self.loop.time()  # type: ignore[attr-defined]
        data_timeout = self.proxy.runtime.config.smtp.data_timeout
        margin = min(_DATA_TIMER_MARGIN_S, max(1.0, data_timeout / 10))
        self._reset_timeout(data_timeout + margin)
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            content, reply = await self._receive()
            if reply is None:
                envelope.content = envelope.original_content = content
                del content
                reply = await self._call_handler_hook("DATA")  # type: ignore[attr-defined]
            self._set_post_data_state()  # type: ignore[attr-defined]
            self._progress_at = self.loop.time()  # type: ignore[attr-defined]
            self._release()  # the message is relayed or refused: before the reply, for a new one
            await self.push(reply)
        finally:
            self._release()
            if self.transport is not None:  # type: ignore[attr-defined]
                self._reset_timeout()
        if self.proxy.draining:
            self.shut_down()

    async def _receive(self) -> tuple[bytes, str | None]:
        """The message up to the lone dot, dot-transparency undone (RFC 5321 §4.5.2); or, with the
        rest read and thrown away, why it is refused. Only CRLF ends a line here: a bare LF or CR
        is message text (the relay makes it CRLF), so `<LF>.<LF>` cannot end the message."""
        limit = self.data_size_limit  # type: ignore[attr-defined]
        reader: asyncio.StreamReader = self._reader  # type: ignore[attr-defined]
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
        """Count `size` more bytes of this session's message in flight, if the limit allows."""
        if self.proxy.bytes_in_flight + size > self.proxy.runtime.config.smtp.max_bytes_in_flight:
            return False
        self.proxy.bytes_in_flight += size
        self._held += size
        return True

    def _release(self) -> None:
        self.proxy.bytes_in_flight -= self._held
        self._held = 0

    async def smtp_RSET(self, arg: str) -> None:
        await super().smtp_RSET(arg)  # type: ignore[misc]
        if self.proxy.draining:
            self.shut_down()


class SmtpSession(_ProxySession, SMTP):
    pass


class LmtpSession(_ProxySession, LMTP):
    pass


class _Refuse(asyncio.Protocol):
    """Answers a connection over `max_sessions` (or during shutdown) and hangs up at once."""

    def __init__(self, reply: str):
        self.reply = reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.reply.encode() + b"\r\n")  # type: ignore[attr-defined]
        transport.close()


class SmtpProxy:
    """The listening socket and its sessions; `runtime` is swapped whole on reload."""

    def __init__(self, runtime: Runtime, metrics: Metrics, hostname: str | None = None):
        self.runtime = runtime
        self.metrics = metrics
        # Resolved once: aiosmtpd would otherwise call socket.getfqdn() (DNS) on every connection.
        self.hostname = hostname or socket.gethostname()
        self.draining = False
        self.bytes_in_flight = 0  # bytes of messages being received or checked, all sessions
        # The EHLO keywords downstream announced last (None: not known yet), for our own EHLO.
        self.downstream_extensions: dict[str, str] | None = None
        self._sessions: weakref.WeakSet[_ProxySession] = weakref.WeakSet()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0 = any free port); returns the bound address."""
        self._server = await asyncio.get_running_loop().create_server(
            self._new_session, host, port, reuse_address=True
        )
        return self._server.sockets[0].getsockname()[:2]

    async def verify(self, config: Config) -> None:
        """Probe downstream for `config` (see `probe_downstream`); QuarantineError if a redirect
        address is refused. Downstream being down only warns: it may start after us."""
        try:
            self.downstream_extensions = await probe_downstream(config, self.hostname)
        except DownstreamError as exc:
            log.warning(
                "cannot check downstream %s now (%s); redirect addresses unverified",
                config.smtp.downstream,
                exc,
            )

    def swap(self, runtime: Runtime) -> Runtime:
        """Serve new messages with `runtime`; messages already being checked finish on the old one."""
        old, self.runtime = self.runtime, runtime
        return old

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    def session_closed(self, session: _ProxySession) -> None:
        self._sessions.discard(session)
        self.metrics.sessions = len(self._sessions)

    async def shutdown(self, grace: float) -> bool:
        """Stop listening, close idle sessions, let open transactions finish for up to `grace` s.

        Returns False when sessions had to be cut: their clients got no final reply, so they
        keep the message and retry. Nothing that was answered 250 is ever lost.
        """
        self.draining = True
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            if session.idle():
                session.shut_down()
        deadline = time.monotonic() + grace
        while self._sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        leftover = list(self._sessions)
        for session in leftover:
            transport = session.transport  # type: ignore[attr-defined]
            if transport is not None:
                transport.abort()
        await asyncio.sleep(0)
        return not leftover

    def _new_session(self) -> asyncio.Protocol:
        smtp = self.runtime.config.smtp
        if self.draining:
            return _Refuse(SHUTTING_DOWN)
        if len(self._sessions) >= smtp.max_sessions:
            self.metrics.sessions_refused += 1
            return _Refuse(TOO_MANY_SESSIONS)
        lmtp = smtp.protocol == "lmtp"
        session_class = LmtpSession if lmtp else SmtpSession
        session = session_class(
            self,
            ProxyHandler(self, lmtp),
            data_size_limit=smtp.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=self.hostname,
            ident=f"{'LMTP' if lmtp else 'ESMTP'} spamfilterd",
            timeout=smtp.command_timeout,
            loop=asyncio.get_running_loop(),
        )
        self._sessions.add(session)
        self.metrics.sessions = len(self._sessions)
        return session
