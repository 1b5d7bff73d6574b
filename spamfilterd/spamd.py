"""The spamd door: SpamAssassin's SPAMC/SPAMD protocol, so spamc, Exim and scripts ask the daemon.

Each connection carries one request (`CHECK`, `SYMBOLS`, `REPORT`, `REPORT_IFSPAM`, `PROCESS`,
`HEADERS`, `PING`, `SKIP`; `TELL` is answered EX_UNAVAILABLE). Messages go through the same
batcher, engine, rules and header rewriting as the SMTP door, so a message gets the same verdict
and the same X-Spam-* headers whichever way it came. A bad request gets the protocol's error
code and the connection is closed; nothing a client sends can stop the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import socket
import stat
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from spamfilterd.batcher import ClassifierError
from spamfilterd.config import SpamdConfig
from spamfilterd.engine import CheckResult
from spamfilterd.message import Header, read_header
from spamfilterd.rules import Decision, Envelope
from spamfilterd.scores import score_text
from spamfilterd.spamd_protocol import (
    EX_DATAERR,
    EX_OK,
    EX_PROTOCOL,
    EX_SOFTWARE,
    EX_TEMPFAIL,
    EX_TIMEOUT,
    EX_UNAVAILABLE,
    PROTOCOL_VERSION,
    REQUIRED_SCORE,
    RESULT_HEADER,
    STATUS_NAMES,
    spamd_score,
    symbol,
)

if TYPE_CHECKING:
    from spamfilterd.batcher import Runtime
    from spamfilterd.http import Metrics

log = logging.getLogger(__name__)

CHECKS = ("CHECK", "SYMBOLS", "REPORT", "REPORT_IFSPAM", "PROCESS", "HEADERS")
VERBS = (*CHECKS, "PING", "SKIP", "TELL")
MAX_LINE = 8192
MAX_HEADERS = 100
_DRAIN_S = 1.0  # after an early error reply, how long unread input is swallowed (no RST)


class ProtocolError(Exception):
    """A request we answer with `code` and close."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code = code


@dataclass
class Request:
    verb: str
    version: float
    headers: dict[str, list[str]] = field(default_factory=dict)
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[-1] if values else None

    def envelope(self) -> Envelope:
        """rspamd-style `From:`/`Rcpt:`; else a `User:` that is an address is the recipient."""
        sender = (self.header("from") or "").strip()
        rcpts = tuple(
            r.strip() for value in self.headers.get("rcpt", []) for r in value.split(",") if r.strip()
        )
        user = (self.header("user") or "").strip()
        if not rcpts and "@" in user:
            rcpts = (user,)
        return Envelope(mail_from="" if sender == "<>" else sender, rcpt_tos=rcpts)


async def read_request(reader: asyncio.StreamReader, limits: SpamdConfig) -> Request | None:
    """Request line, headers and body, within the size limit; ProtocolError for anything wrong.

    None when the client hung up without sending anything (a connection check, a port scan).
    """
    try:
        line = await _line(reader, first=True)
    except EOFError:
        return None
    parts = line.split()
    if len(parts) != 2 or not parts[1].startswith("SPAMC/"):
        raise ProtocolError(EX_PROTOCOL, f"bad request line: {line[:80]!r}")
    verb = parts[0].upper()
    if verb not in VERBS:
        raise ProtocolError(EX_PROTOCOL, f"unknown command {verb[:20]!r}")
    try:
        version = float(parts[1].removeprefix("SPAMC/"))
    except ValueError:
        raise ProtocolError(EX_PROTOCOL, f"bad protocol version {parts[1][:20]!r}") from None
    request = Request(verb, version)
    for _ in range(MAX_HEADERS + 1):
        line = await _line(reader)
        if not line:
            break
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise ProtocolError(EX_PROTOCOL, f"bad header line: {line[:80]!r}")
        request.headers.setdefault(name.strip().lower(), []).append(value.strip())
    else:
        raise ProtocolError(EX_PROTOCOL, f"more than {MAX_HEADERS} header lines")
    if verb in ("PING", "SKIP"):
        return request
    request.body = await _body(reader, request, limits.max_message_size)
    return request


async def _line(reader: asyncio.StreamReader, first: bool = False) -> str:
    try:
        raw = await reader.readuntil(b"\n")
    except asyncio.LimitOverrunError:
        raise ProtocolError(EX_PROTOCOL, f"header line longer than {MAX_LINE} bytes") from None
    except asyncio.IncompleteReadError as exc:
        if first and not exc.partial:
            raise EOFError from None
        raise ProtocolError(EX_PROTOCOL, "connection closed in the middle of the request headers") from None
    return raw.rstrip(b"\r\n").decode("utf-8", "replace")


async def _body(reader: asyncio.StreamReader, request: Request, limit: int) -> bytes:
    length_text = request.header("content-length")
    if length_text is None:  # protocol 1.0/1.1: the message runs until the client half-closes
        body = await reader.read(limit + 1)
        while len(body) <= limit and not reader.at_eof():
            body += await reader.read(limit + 1 - len(body))
        if len(body) > limit:
            raise ProtocolError(EX_DATAERR, f"message larger than spamd.max_message_size ({limit} bytes)")
    else:
        if not length_text.isdigit():
            raise ProtocolError(EX_PROTOCOL, f"bad Content-length {length_text[:20]!r}")
        length = int(length_text)
        if length > limit:
            raise ProtocolError(
                EX_DATAERR, f"message of {length} bytes is over spamd.max_message_size ({limit} bytes)"
            )
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise ProtocolError(
                EX_PROTOCOL, f"message shorter than its Content-length ({len(exc.partial)} < {length})"
            ) from None
    compress = (request.header("compress") or "").lower()
    if compress == "zlib":
        return _inflate(body, limit)
    if compress:
        raise ProtocolError(EX_PROTOCOL, f"unsupported Compress: {compress[:20]!r} (only zlib)")
    return body


def _inflate(data: bytes, limit: int) -> bytes:
    inflater = zlib.decompressobj()
    try:
        body = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ProtocolError(EX_PROTOCOL, f"bad zlib data: {exc}") from None
    if len(body) > limit or inflater.unconsumed_tail:
        raise ProtocolError(EX_DATAERR, f"message larger than spamd.max_message_size ({limit} bytes)")
    return body


def is_spam(result: CheckResult) -> bool:
    """Spam for spamd clients: what the rules treat as spam (tagged, rejected or quarantined).

    Without rules that is exactly verdict spam; a rule that accepts a spam (a trusted sender)
    or tags an unsure message moves the answer with it, as it moves X-Spam-Flag.
    """
    actions = result.decision.actions
    return result.decision.flagged or "reject" in actions or "redirect" in actions


def symbols(result: CheckResult, model_id: str) -> list[str]:
    """The "tests hit" of SYMBOLS and spamc -y: verdict, rule, GTUBE, actions and model."""
    decision = result.decision
    names = [symbol("VERDICT_", decision.verdict), symbol("RULE_", decision.rule)]
    if decision.gtube:
        names.append("GTUBE")
    names.extend(symbol("ACTION_", action) for action in decision.actions)
    names.append(symbol("MODEL_", model_id))
    return names


def report(result: CheckResult, spam_threshold: float, model_id: str) -> str:
    """The REPORT body (Exim's $spam_report): the decision in words, one fact per line."""
    decision = result.decision
    lines = [
        f"spamfilterd verdict: {decision.verdict} (P(spam) {score_text(decision.score)},"
        f" spam at {spam_threshold:.3f} or above)",
        f"rule: {decision.rule}; actions: {','.join(decision.actions)}",
        f"model: {model_id}",
    ]
    lines.extend(f"note: {note}" for note in result.notes)
    return "\n".join(lines) + "\n"


def result_record(result: CheckResult, spam_threshold: float, model_id: str) -> dict:
    """The whole decision, for `spamfilterd classify` (RESULT_HEADER); floats survive JSON exactly."""
    decision = result.decision
    return {
        "verdict": decision.verdict,
        "score": decision.score,
        "required": spam_threshold,
        "actions": list(decision.actions),
        "rule": decision.rule,
        "gtube": decision.gtube,
        "model": model_id,
        "text_chars": result.text_chars,
        "notes": result.notes,
    }


def headers_only(message: bytes) -> bytes:
    """The message up to and including the blank line after its headers (HEADERS request)."""
    pos = 0
    while pos < len(message):
        end = message.find(b"\n", pos)
        if end < 0:
            break
        if message[pos:end] in (b"", b"\r"):
            return message[: end + 1]
        pos = end + 1
    return message


def response(
    code: int, headers: Sequence[tuple[str, str]] = (), body: bytes | None = None, text: str = ""
) -> bytes:
    status = text or STATUS_NAMES.get(code, "EX_SOFTWARE")
    head = f"SPAMD/{PROTOCOL_VERSION} {code} {status}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    if body is None:
        return (head + "\r\n").encode()
    return (head + "\r\n").encode() + body


def answer(request: Request, result: CheckResult, spam_threshold: float, model_id: str) -> bytes:
    """The response to a checking request; protocol 1.2 and older get only the Spam header."""
    spam = is_spam(result)
    score = (
        2 * REQUIRED_SCORE
        if result.decision.gtube
        else spamd_score(result.decision.score, spam_threshold, spam)
    )
    word = ("Yes" if spam else "No") if request.verb == "REPORT_IFSPAM" else ("True" if spam else "False")
    spam_header = ("Spam", f"{word} ; {score:.1f} / {REQUIRED_SCORE:.1f}")
    verb = request.verb
    if verb == "PROCESS":
        body = result.message
    elif verb == "HEADERS":
        body = headers_only(result.message)
    elif verb == "SYMBOLS":
        body = ",".join(symbols(result, model_id)).encode()
    elif verb == "REPORT" or (verb == "REPORT_IFSPAM" and spam):
        body = report(result, spam_threshold, model_id).encode()
    else:
        body = b""
    if request.version < 1.3 and verb != "PROCESS":  # one header only, as old clients (Exim) parse it
        return response(EX_OK, [spam_header], body)
    headers = [("Content-length", str(len(body))), spam_header]
    if (request.header(RESULT_HEADER) or "").lower() == "yes":
        headers.append(
            (RESULT_HEADER, json.dumps(result_record(result, spam_threshold, model_id), ensure_ascii=True))
        )
    return response(EX_OK, headers, body)


def peer_allowed(peer: object, networks: tuple[str, ...] | None) -> bool:
    """Unix sockets: the file mode decides. TCP: loopback, or the configured networks."""
    if not isinstance(peer, tuple):
        return True
    try:
        address = ipaddress.ip_address(peer[0].split("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if networks is None:
        return address.is_loopback
    return address.is_loopback or any(address in ipaddress.ip_network(n, strict=False) for n in networks)


class SpamdServer:
    """The listening sockets and their connections; the runtime is read anew for every request."""

    def __init__(self, runtime: Callable[[], Runtime], metrics: Metrics):
        self._runtime = runtime
        self.metrics = metrics
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._unix_paths: list[Path] = []
        self._tasks: weakref.WeakSet[asyncio.Task] = weakref.WeakSet()

    @property
    def connections(self) -> int:
        return len(self._tasks)

    async def start(self, addresses: tuple[str, ...], socket_mode: str) -> list[str]:
        """Listen on every address (port 0 = any free port); returns what was bound, as text."""
        bound = []
        for address in addresses:
            if address.startswith("unix:"):
                path = Path(address.removeprefix("unix:"))  # validated by the config
                _clear_stale_socket(path)
                server = await asyncio.start_unix_server(self._serve, path=str(path), limit=MAX_LINE)
                os.chmod(path, int(socket_mode, 8))
                self._unix_paths.append(path)
                bound.append(f"unix:{path}")
            else:
                host, _, port = address.rpartition(":")  # validated by the config; port 0 = any
                server = await asyncio.start_server(
                    self._serve, host.strip("[]"), int(port), limit=MAX_LINE, reuse_address=True
                )
                host, port = server.sockets[0].getsockname()[:2]
                bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
            self._servers.append(server)
        return bound

    async def shutdown(self, grace: float) -> bool:
        """Stop listening; requests being answered get up to `grace` seconds, then are cut."""
        self.draining = True
        for server in self._servers:
            server.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()
        pending = [task for task in self._tasks if not task.done()]
        if pending:
            _, late = await asyncio.wait(pending, timeout=grace)
            for task in late:
                task.cancel()
            return not late
        return True

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        runtime = self._runtime()
        limits = runtime.config.spamd
        peer = writer.get_extra_info("peername")
        try:
            if not peer_allowed(peer, limits.allowed_networks):
                log.warning("spamd: refused connection from %s (not in spamd.allowed_networks)", peer[0])
                self.metrics.errors["spamd_refused"] += 1
                return
            if self.draining or len(self._tasks) >= limits.max_connections:
                self.metrics.sessions_refused += 1
                await self._send(writer, response(EX_TEMPFAIL, text="too many connections, try again later"))
                return
            if task is not None:
                self._tasks.add(task)
            await self._handle(reader, writer, runtime)
        except (OSError, asyncio.CancelledError):
            pass  # the client went away, or shutdown cut a late request: it retries or falls back
        except Exception:  # a bug must cost this request only, never the daemon
            log.exception("spamd: request failed")
            with contextlib.suppress(Exception):
                await self._send(writer, response(EX_SOFTWARE, text="EX_SOFTWARE internal error"))
        finally:
            writer.close()

    async def _handle(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, runtime: Runtime
    ) -> None:
        limits = runtime.config.spamd
        started = time.monotonic()
        try:
            async with asyncio.timeout(limits.read_timeout):
                request = await read_request(reader, limits)
        except ProtocolError as exc:
            self.metrics.errors["spamd_protocol"] += 1
            log.info("spamd: bad request: %s", exc)
            await self._send(writer, response(exc.code, text=f"{STATUS_NAMES[exc.code]} {exc}"), drain=reader)
            return
        except TimeoutError:
            self.metrics.errors["spamd_timeout"] += 1
            text = f"EX_TIMEOUT request not received within {limits.read_timeout:g} s (spamd.read_timeout)"
            await self._send(writer, response(EX_TIMEOUT, text=text))
            return
        if request is None or request.verb == "SKIP":
            return
        if request.verb == "PING":
            await self._send(writer, f"SPAMD/{PROTOCOL_VERSION} 0 PONG\r\n".encode())
            return
        if request.verb == "TELL":
            text = "EX_UNAVAILABLE TELL is not supported: retrain with spamfilterd-train (docs/training.md)"
            await self._send(writer, response(EX_UNAVAILABLE, text=text))
            return
        await self._check(writer, runtime, request, started)

    async def _check(
        self, writer: asyncio.StreamWriter, runtime: Runtime, request: Request, started: float
    ) -> None:
        engine = runtime.engine
        envelope = request.envelope()
        header = read_header(request.body)  # once: for the log line, the rules, the text and tagging
        try:
            result = await runtime.batcher.check(header, envelope)
        except ClassifierError as exc:
            log.warning("classifier error: %s", exc)
            self.metrics.errors["classifier"] += 1
            if runtime.config.smtp.on_classifier_error == "tempfail":
                self._record(runtime, request, header, envelope, None, "tempfailed", started)
                await self._send(writer, response(EX_TEMPFAIL, text="EX_TEMPFAIL spam filter unavailable"))
                return
            message = await runtime.batcher.unchecked(header)
            decision = Decision(verdict="unchecked", score=0.0, actions=("accept",), rule="-")
            result = CheckResult(decision, message, 0, ["classifier failed; message unchecked"])
        payload = answer(request, result, engine.thresholds.spam, engine.model_id)
        self._record(runtime, request, header, envelope, result, "answered", started)
        await self._send(writer, payload)

    async def _send(
        self, writer: asyncio.StreamWriter, data: bytes, drain: asyncio.StreamReader | None = None
    ):
        writer.write(data)
        timeout = self._runtime().config.spamd.read_timeout
        async with asyncio.timeout(timeout):  # a client that does not read its answer is cut off
            await writer.drain()
        if drain is not None and writer.can_write_eof():
            # Swallow what the client still sends, so closing does not reset the connection
            # before the client has read our error reply.
            with contextlib.suppress(Exception):
                writer.write_eof()
                async with asyncio.timeout(_DRAIN_S):
                    while await drain.read(65536):
                        pass

    def _record(
        self,
        runtime: Runtime,
        request: Request,
        header: Header,
        envelope: Envelope,
        result: CheckResult | None,
        action: str,
        started: float,
    ) -> None:
        seconds = time.monotonic() - started
        decision = result.decision if result is not None else None
        verdict = decision.verdict if decision is not None else "unchecked"
        self.metrics.observe_message(verdict, action, seconds)
        fields = {
            "door": "spamd",
            "request": request.verb,
            "message_id": header.message_id,
            "user": (request.header("user") or "-")[:100],
            "rcpts": len(envelope.rcpt_tos),
            "size": len(request.body),
            "verdict": verdict,
            "score": "-" if decision is None else score_text(decision.score),
            "rule": "-" if decision is None else decision.rule,
            "spam": "-" if result is None else str(is_spam(result)).lower(),
            "action": action,
            "ms": round(seconds * 1000),
            "model": runtime.engine.model_id,
        }
        log.info("request %s", request.verb, extra={"fields": fields})


def _clear_stale_socket(path: Path) -> None:
    """Remove a socket left by a previous run; refuse to touch anything that is not a socket."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        try:
            path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise OSError(
                f"cannot create {path.parent}: {exc.strerror} (systemd's RuntimeDirectory=spamfilterd"
                " creates /run/spamfilterd; elsewhere create the directory)"
            ) from None
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket; remove it or choose another spamd.listen path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody answers: a leftover
    else:
        raise OSError(f"{path}: another daemon is listening there")
    finally:
        probe.close()
