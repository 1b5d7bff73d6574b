"""Health and metrics for the daemon: `/healthz`, `/readyz` and Prometheus text `/metrics`.

Stdlib only, on the daemon's own event loop: a monitoring probe that gets an answer proves the
loop that serves SMTP is alive. Meant for loopback (`http.listen: 127.0.0.1:9025`); it serves
counters, never message content.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Seconds from end-of-DATA to our reply: classification plus downstream delivery.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_REQUEST_TIMEOUT = 5.0


def _label(value: str) -> str:
    return value.replace("\\", r"\\").replace('"', r"\"").replace("\n", r"\n")


@dataclass
class Metrics:
    """Process-wide counters; the proxy updates them on the event loop, so no locking is needed."""

    messages: Counter = field(default_factory=Counter)  # (verdict, action) -> count
    errors: Counter = field(default_factory=Counter)  # kind -> count
    reloads: Counter = field(default_factory=Counter)  # "ok" | "failed" -> count
    latency_buckets: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    latency_count: int = 0
    sessions: int = 0
    sessions_refused: int = 0
    batches: int = 0
    batched_messages: int = 0
    model_id: str = ""
    ready: bool = False

    def observe_message(self, verdict: str, action: str, seconds: float) -> None:
        self.messages[(verdict, action)] += 1
        self.latency_sum += seconds
        self.latency_count += 1
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_buckets[i] += 1

    def observe_batch(self, size: int) -> None:
        self.batches += 1
        self.batched_messages += size

    def render(self) -> str:
        """Prometheus text exposition format 0.0.4."""
        out: list[str] = []

        def metric(name: str, kind: str, doc: str, samples: list[tuple[str, float]]) -> None:
            out.append(f"# HELP {name} {doc}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(f"{name}{labels} {value:g}" for labels, value in samples)

        metric(
            "spamfilterd_messages_total",
            "counter",
            "Messages handled, by classifier verdict and final action.",
            [
                (f'{{verdict="{_label(v)}",action="{_label(a)}"}}', n)
                for (v, a), n in sorted(self.messages.items())
            ],
        )
        buckets = zip(LATENCY_BUCKETS, self.latency_buckets, strict=True)
        cumulative = [(f'{{le="{bound:g}"}}', n) for bound, n in buckets]
        metric(
            "spamfilterd_message_duration_seconds",
            "histogram",
            "Seconds from end of DATA to the reply (classification and downstream delivery).",
            [],
        )
        out.extend(f"spamfilterd_message_duration_seconds_bucket{lb} {n}" for lb, n in cumulative)
        out.append(f'spamfilterd_message_duration_seconds_bucket{{le="+Inf"}} {self.latency_count}')
        out.append(f"spamfilterd_message_duration_seconds_sum {self.latency_sum:.6f}")
        out.append(f"spamfilterd_message_duration_seconds_count {self.latency_count}")
        metric(
            "spamfilterd_errors_total",
            "counter",
            "Failures by kind (classifier, downstream, deadline, quarantine).",
            [(f'{{kind="{_label(k)}"}}', n) for k, n in sorted(self.errors.items())],
        )
        metric("spamfilterd_sessions", "gauge", "Open SMTP/LMTP client sessions.", [("", self.sessions)])
        metric(
            "spamfilterd_sessions_refused_total",
            "counter",
            "Connections refused with 421 because max_sessions were open.",
            [("", self.sessions_refused)],
        )
        metric("spamfilterd_classify_batches_total", "counter", "Model calls.", [("", self.batches)])
        metric(
            "spamfilterd_classify_batch_messages_total",
            "counter",
            "Messages scored; divided by the batches, the mean batch size.",
            [("", self.batched_messages)],
        )
        metric(
            "spamfilterd_reloads_total",
            "counter",
            "SIGHUP reloads by result (ok, failed).",
            [(f'{{result="{r}"}}', self.reloads[r]) for r in ("ok", "failed")],
        )
        metric(
            "spamfilterd_model_info",
            "gauge",
            "The model being served (always 1, the id is the label).",
            [(f'{{model_id="{_label(self.model_id)}"}}', 1)],
        )
        metric("spamfilterd_ready", "gauge", "1 while accepting mail.", [("", int(self.ready))])
        return "\n".join(out) + "\n"


class HealthServer:
    """A minimal HTTP/1.0-style server: one request per connection, GET and HEAD only.

    `readiness` returns None when ready, else the reason `/readyz` gives with its 503.
    """

    def __init__(self, metrics: Metrics, readiness: Callable[[], Awaitable[str | None]] | None = None):
        self.metrics = metrics
        self._readiness = readiness
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen (port 0 = any free port); returns the bound address."""
        self._server = await asyncio.start_server(self._handle, host, port)
        return self._server.sockets[0].getsockname()[:2]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _respond(self, path: str) -> tuple[int, str, str]:
        if path == "/healthz":
            return 200, "text/plain; charset=utf-8", "ok\n"
        if path == "/readyz":
            if not self.metrics.ready:
                return 503, "text/plain; charset=utf-8", "not ready\n"
            reason = await self._readiness() if self._readiness else None
            if reason:
                return 503, "text/plain; charset=utf-8", f"not ready: {reason}\n"
            return 200, "text/plain; charset=utf-8", "ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        return 404, "text/plain; charset=utf-8", "not found (try /healthz, /readyz, /metrics)\n"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT):
                request = await reader.readline()
                while (await reader.readline()).strip():
                    pass
            method, _, rest = request.decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            if method in ("GET", "HEAD"):
                status, ctype, body = await self._respond(path)
            else:
                status, ctype, body = 405, "text/plain; charset=utf-8", "method not allowed\n"
            payload = body.encode()
            reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}
            head = (
                f"HTTP/1.1 {status} {reason[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode() + (b"" if method == "HEAD" else payload))
            await writer.drain()
        except (OSError, TimeoutError, ValueError) as exc:
            log.debug("health request failed: %s", exc)
        finally:
            writer.close()
