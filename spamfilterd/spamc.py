"""The thin client of `spamfilterd classify`: ask the running daemon over its spamd door.

A pipe filter that imports torch and loads a model pays seconds and hundreds of MB per message;
this client pays a socket round trip. It imports neither torch nor asyncio, and it gets the
daemon's whole decision back through our `Spamfilterd-Result` header, so `classify` prints
exactly what it would print in-process.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

from spamfilterd.config import split_spamd_address
from spamfilterd.rules import Decision, Envelope
from spamfilterd.spamd_protocol import EX_OK, PROTOCOL_VERSION, RESULT_HEADER

MAX_RESPONSE = 64 * 1024 * 1024


class DaemonUnavailable(Exception):
    """The daemon could not be reached or did not answer with a verdict."""


@dataclass
class RemoteResult:
    """The daemon's answer in the shape of `engine.CheckResult`."""

    decision: Decision
    message: bytes
    text_chars: int
    notes: list[str] = field(default_factory=list)


@dataclass
class Response:
    code: int
    text: str
    headers: dict[str, str]
    body: bytes


class SpamdClient:
    """One request per connection, as spamc does; every failure is a DaemonUnavailable."""

    def __init__(self, address: str, timeout: float):
        self.address = address
        self.where = split_spamd_address(address)
        self.timeout = timeout
        self.model_id = ""
        self.spam_threshold = 0.0  # the daemon's, as of its last answer

    def check_many(self, raws: list[bytes], envelopes: list[Envelope]) -> list[RemoteResult]:
        return [self._result("CHECK", raw, envelope) for raw, envelope in zip(raws, envelopes, strict=True)]

    def check(self, raw: bytes, envelope: Envelope) -> RemoteResult:
        """The tagged message too (PROCESS), for --filter."""
        return self._result("PROCESS", raw, envelope)

    def _result(self, verb: str, raw: bytes, envelope: Envelope) -> RemoteResult:
        response = self.request(verb, raw, envelope)
        try:
            record = json.loads(response.headers[RESULT_HEADER.lower()])
            decision = Decision(
                verdict=record["verdict"],
                score=float(record["score"]),
                actions=tuple(record["actions"]),
                rule=record["rule"],
                gtube=bool(record["gtube"]),
            )
            result = RemoteResult(decision, response.body, int(record["text_chars"]), list(record["notes"]))
            self.model_id = str(record["model"])
            self.spam_threshold = float(record["required"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DaemonUnavailable(f"answer without a usable {RESULT_HEADER} header ({exc!r})") from None
        if decision.verdict == "unchecked":
            raise DaemonUnavailable("its classifier failed (X-Spam-Status: unchecked)")
        return result

    def request(self, verb: str, raw: bytes, envelope: Envelope) -> Response:
        head = [f"{verb} SPAMC/{PROTOCOL_VERSION}", f"Content-length: {len(raw)}", f"{RESULT_HEADER}: yes"]
        if envelope.mail_from:
            head.append(f"From: {envelope.mail_from}")
        head.extend(f"Rcpt: {rcpt}" for rcpt in envelope.rcpt_tos)
        payload = ("\r\n".join(head) + "\r\n\r\n").encode() + raw
        try:
            data = self._exchange(payload)
        except OSError as exc:  # refused, no such socket, permission, timeout
            raise DaemonUnavailable(exc.strerror or str(exc) or type(exc).__name__) from None
        response = parse_response(data)
        if response.code != EX_OK:
            raise DaemonUnavailable(f"it answered {response.code} {response.text}")
        return response

    def _exchange(self, payload: bytes) -> bytes:
        if isinstance(self.where, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(self.where)
            except OSError:
                sock.close()
                raise
        else:
            sock = socket.create_connection(self.where, timeout=self.timeout)
        with sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            chunks = []
            received = 0
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                received += len(chunk)
                if received > MAX_RESPONSE:
                    raise DaemonUnavailable(f"answer larger than {MAX_RESPONSE} bytes")
        return b"".join(chunks)


def parse_response(data: bytes) -> Response:
    """`SPAMD/x code text`, headers, blank line, body (its length checked against Content-length)."""
    head, sep, body = data.partition(b"\r\n\r\n")
    lines = head.decode("utf-8", "replace").split("\r\n")
    status = lines[0].split(None, 2)
    if len(status) < 2 or not status[0].startswith("SPAMD/") or not status[1].isdigit():
        raise DaemonUnavailable(f"not a spamd answer: {lines[0][:80]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = headers.get("content-length")
    if sep and length is not None and (not length.isdigit() or int(length) != len(body)):
        raise DaemonUnavailable(f"answer cut short ({len(body)} of {length} bytes)")
    return Response(int(status[1]), status[2] if len(status) > 2 else "", headers, body)
