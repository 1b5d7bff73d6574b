"""The SMTP/LMTP proxy: aiosmtpd faces the client, the downstream MTA sits behind, the filter between.

Commands are relayed in lock-step, like spampd does: MAIL FROM and each RCPT TO go to downstream
as they arrive and downstream's own reply goes back to the client, so every recipient gets the
downstream's real per-recipient answer and the client keeps what downstream would not take. The
end of DATA is answered only after downstream answered the message (one reply per recipient in
LMTP). Anything that goes wrong on our side is a 4xx: the sender keeps the message and retries.
`protocol: lmtp` means LMTP on both sides (e.g. Postfix `lmtp:` → spamfilterd → Dovecot LMTP).

This module holds the aiosmtpd hooks and the one decision per message: deliver, redirect, reject
or tempfail. The servers and their limits are in `smtp_server`, the downstream transaction in
`relay`, the wiring in `serve`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import Envelope as SmtpEnvelope

from spamfilterd.batcher import ClassifierError
from spamfilterd.message import Header, read_header
from spamfilterd.relay import DownstreamError, RelaySession, Reply
from spamfilterd.rules import Envelope, recipient_policy, refusing
from spamfilterd.smtp_server import SHUTTING_DOWN

if TYPE_CHECKING:
    from spamfilterd.batcher import Runtime
    from spamfilterd.engine import Delivery
    from spamfilterd.http import Metrics
    from spamfilterd.rules import Rule
    from spamfilterd.smtp_server import ProxySession, ProxySMTP

log = logging.getLogger(__name__)

DOWNSTREAM_DOWN = "451 4.4.1 Downstream mail server unavailable, try again later"
DOWNSTREAM_LOST = "451 4.4.2 Lost the downstream mail server, try again later"
DEADLINE = "451 4.4.2 Filtering took too long, try again later"
CLASSIFIER_DOWN = "451 4.7.1 Spam filter unavailable, try again later"
TOO_MANY_RECIPIENTS = "452 4.5.3 Too many recipients"
OTHER_POLICY = "452 4.5.3 Recipient has another filter policy, send it in a separate transaction"
BAD_SENDER = "553 5.1.7 Sender address is not valid UTF-8"
BAD_RECIPIENT = "553 5.1.3 Recipient address is not valid UTF-8"


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


def _same_policy(rules: tuple[Rule, ...], address: str, first: str) -> bool:
    """One SMTP reply must answer every recipient: those whom the rules may answer differently
    (postmaster and a rejecting rule, say) go in transactions of their own."""
    return not refusing(rules) or recipient_policy(rules, address) == recipient_policy(rules, first)


def _lost(outcome: Outcome) -> Outcome:
    outcome.action, outcome.replies, outcome.error = "deferred", [DOWNSTREAM_LOST], "downstream"
    return outcome


class ProxyHandler:
    """The aiosmtpd hooks, one handler for every connection: what a connection holds is on its
    session (`session.relay`, the transaction downstream); the server carries the proxy."""

    async def handle_EHLO(
        self,
        server: ProxySMTP,
        session: ProxySession,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extra = ["250-PIPELINING"]
        if "DSN" in await session.relay.extensions():
            extra.append("250-DSN")  # downstream does DSN: NOTIFY/ORCPT/ENVID/RET pass through
        return [*responses[:-1], *extra, responses[-1]]

    async def handle_MAIL(
        self,
        server: ProxySMTP,
        session: ProxySession,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if server.proxy.draining:
            if server.transport is not None:
                asyncio.get_running_loop().call_soon(server.transport.close)
            return SHUTTING_DOWN
        if not _utf8(address):
            return BAD_SENDER
        mail_options = server.original_params(mail_options)
        try:
            reply = await session.relay.start(address, mail_options)
        except DownstreamError:
            return DOWNSTREAM_DOWN
        if reply.ok:
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return _passable(reply).render()

    async def handle_RCPT(
        self,
        server: ProxySMTP,
        session: ProxySession,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        config = server.proxy.runtime.config
        if len(envelope.rcpt_tos) >= config.smtp.max_recipients:
            return TOO_MANY_RECIPIENTS
        if not _utf8(address):
            return BAD_RECIPIENT
        if (
            not server.lmtp
            and envelope.rcpt_tos
            and not _same_policy(config.rules, address, envelope.rcpt_tos[0])
        ):
            return OTHER_POLICY
        rcpt_options = server.original_params(rcpt_options)
        try:
            reply = await session.relay.rcpt(address, rcpt_options)
        except DownstreamError:
            return DOWNSTREAM_LOST
        if reply.ok:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return _passable(reply).render()

    async def handle_DATA(self, server: ProxySMTP, session: ProxySession, envelope: SmtpEnvelope) -> str:
        started = time.monotonic()
        runtime = server.proxy.runtime
        relay = session.relay
        # The header block is read here, once: for the log line, the rules, the text and tagging.
        message = read_header(envelope.original_content or b"")
        envelope.content = envelope.original_content = None  # one reference less to a large object
        sender = envelope.mail_from or "<>"  # set: aiosmtpd asks for MAIL before DATA
        recipients = tuple(envelope.rcpt_tos)
        logged = {"message_id": message.message_id, "size": len(message.raw)}
        work = self._filter_and_relay(runtime, relay, sender, envelope.mail_options, recipients, message)
        del message  # `work` holds the only reference, and drops it once the message is checked
        try:
            async with asyncio.timeout_at(session.data_started + runtime.config.smtp.data_timeout):
                outcome = await work
        except TimeoutError:
            relay.drop("per-message deadline (smtp.data_timeout) exceeded", "deadline")
            outcome = Outcome("unknown", None, (), "-", "deferred", [DEADLINE], "deadline")
        relay.open_transaction = False
        _record(
            server.proxy.metrics, runtime, outcome, sender, recipients, logged, time.monotonic() - started
        )
        replies = outcome.replies
        if server.lmtp and len(replies) != len(recipients):
            replies = replies[:1] * len(recipients)
        return "\r\n".join(replies if server.lmtp else replies[:1])

    async def handle_QUIT(self, server: ProxySMTP, session: ProxySession, envelope: SmtpEnvelope) -> str:
        session.relay.quit()
        return "221 2.0.0 Bye"

    async def _filter_and_relay(
        self,
        runtime: Runtime,
        relay: RelaySession,
        sender: str,
        options: list[str],
        recipients: tuple[str, ...],
        message: Header,
    ) -> Outcome:
        if not relay.live:
            return Outcome("unknown", None, (), "-", "deferred", [DOWNSTREAM_LOST], "downstream")
        envelope = Envelope(mail_from="" if sender == "<>" else sender, rcpt_tos=recipients)
        try:
            result = await runtime.batcher.check(message, envelope)
        except ClassifierError as exc:
            log.warning("classifier error: %s", exc)
            if runtime.config.smtp.on_classifier_error == "tempfail":
                await relay.abort()
                return Outcome("unchecked", None, (), "-", "tempfailed", [CLASSIFIER_DOWN], "classifier")
            unchecked = await runtime.batcher.unchecked(message)
            outcome = Outcome("unchecked", None, ("accept",), "-", "delivered", [], "classifier")
            return await self._deliver(relay, outcome, unchecked, len(recipients))
        del message  # the tagged copies below are all that is relayed
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
            return await self._apply(relay, outcome, deliveries[0], sender, options, len(recipients))
        return await self._split(relay, outcome, deliveries, sender, options, recipients)

    async def _apply(
        self,
        relay: RelaySession,
        outcome: Outcome,
        delivery: Delivery,
        sender: str,
        options: list[str],
        count: int,
    ) -> Outcome:
        """The policy decision for one group of recipients: reject, tempfail, redirect or deliver,
        on the transaction opened during RCPT."""
        decision = delivery.decision
        if "reject" in decision.actions:
            await relay.abort()
            outcome.action, outcome.replies = "rejected", [f"554 5.7.1 {decision.reject_text}"]
            return outcome
        if "tempfail" in decision.actions:
            await relay.abort()
            outcome.action, outcome.replies = "tempfailed", [f"451 4.7.1 {decision.tempfail_text}"]
            return outcome
        if "redirect" in decision.actions and decision.redirect_to:
            return await self._redirect(
                relay, outcome, sender, options, decision.redirect_to, delivery.message
            )
        return await self._deliver(relay, outcome, delivery.message, count)

    async def _split(
        self,
        relay: RelaySession,
        outcome: Outcome,
        deliveries: list[Delivery],
        sender: str,
        options: list[str],
        recipients: tuple[str, ...],
    ) -> Outcome:
        """Recipients with different decisions: one downstream transaction per decision, as amavis
        does; each recipient gets the answer of its own transaction (LMTP), or all share one (SMTP)."""
        await relay.abort()  # the transaction opened during RCPT had everyone in it
        answers: dict[str, Reply] = {}
        actions = []
        for delivery in deliveries:
            part = Outcome(outcome.verdict, outcome.score, delivery.decision.actions, "", "", [])
            if relay.connection is None:
                part = _lost(part)
                outcome.error = "downstream"
            else:
                part = await self._group(relay, part, delivery, sender, options)
            outcome.error = outcome.error or part.error
            actions.append(part.action)
            replies = [_ours(r) for r in part.replies]
            for i, rcpt in enumerate(delivery.recipients):
                answers[rcpt] = replies[min(i, len(replies) - 1)]
        outcome.action = actions[0] if len(set(actions)) == 1 else "split"
        replies = [answers[rcpt] for rcpt in recipients]
        outcome.replies = [r.render() for r in (replies if relay.lmtp else [_one_reply(replies)])]
        return outcome

    async def _group(
        self, relay: RelaySession, outcome: Outcome, delivery: Delivery, sender: str, options: list[str]
    ) -> Outcome:
        """Deliver (or refuse) one group of recipients in a transaction of its own."""
        decision = delivery.decision
        if "reject" in decision.actions or "tempfail" in decision.actions:
            return await self._apply(relay, outcome, delivery, sender, options, len(delivery.recipients))
        if "redirect" in decision.actions and decision.redirect_to:
            return await self._redirect(
                relay, outcome, sender, options, decision.redirect_to, delivery.message
            )
        params = [(r, relay.rcpt_params.get(r, [])) for r in delivery.recipients]
        try:
            start, *answers = await relay.restart(sender, options, params)
        except DownstreamError:
            return _lost(outcome)
        if not start.ok:
            outcome.action, outcome.replies = _action([start], ""), [_passable(start).render()]
            return outcome
        accepted = [i for i, reply in enumerate(answers) if reply.ok]
        if accepted:
            sent = await self._deliver(relay, outcome, delivery.message, len(accepted))
            data = [_ours(r) for r in sent.replies]
            for n, i in enumerate(accepted):
                answers[i] = data[min(n, len(data) - 1)]
        answers = [_passable(r) for r in answers]
        outcome.action = _action(answers, "delivered")
        outcome.replies = [r.render() for r in answers]
        return outcome

    async def _deliver(
        self, relay: RelaySession, outcome: Outcome, message: bytes, recipients: int
    ) -> Outcome:
        try:
            replies = await relay.deliver(message, recipients)
        except DownstreamError:
            return _lost(outcome)
        replies = [_passable(r) for r in replies]
        outcome.action = _action(replies, "delivered")
        outcome.replies = [r.render() for r in replies]
        return outcome

    async def _redirect(
        self,
        relay: RelaySession,
        outcome: Outcome,
        sender: str,
        options: list[str],
        quarantine: str,
        message: bytes,
    ) -> Outcome:
        """A new downstream transaction to the quarantine address only; its answer is everyone's."""
        try:
            setup = await relay.restart(sender, options, [(quarantine, [])])
        except DownstreamError:
            return _lost(outcome)
        if not setup[-1].ok:
            # Our quarantine setting is at fault, not the sender: defer, never bounce.
            await relay.abort()
            outcome.action, outcome.error = "deferred", "quarantine"
            outcome.replies = [f"451 4.3.5 Quarantine delivery refused: {setup[-1].code} {setup[-1].text}"]
            return outcome
        outcome = await self._deliver(relay, outcome, message, 1)
        if outcome.action == "delivered":
            outcome.action = "redirected"
        return outcome


def _record(
    metrics: Metrics,
    runtime: Runtime,
    outcome: Outcome,
    sender: str,
    recipients: tuple[str, ...],
    logged: dict[str, Any],
    seconds: float,
) -> None:
    """One log record and the metrics for a message; never any of its content."""
    if outcome.error in ("classifier", "quarantine"):  # downstream/deadline: counted when dropped
        metrics.errors[outcome.error] += 1
    metrics.observe_message(outcome.verdict, outcome.action, seconds)
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
    log.info("message %s", outcome.action, extra={"fields": fields})
