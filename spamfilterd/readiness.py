"""What `/readyz` means: the daemon can filter and deliver a message now.

Ready needs three things: the daemon is serving (not starting, not draining), the downstream MTA
greets us (probed on every request with a connect, EHLO/LHLO and QUIT, so readiness comes back
as soon as downstream does), and the model answers (trusted while the last message was
classified; after a failure a one-line probe must be answered, so readiness returns with it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from spamfilterd.config import split_host_port
from spamfilterd.relay import DownstreamConnection, DownstreamError

if TYPE_CHECKING:
    from spamfilterd.smtp_server import SmtpProxy

# Seconds each probe may take, so that a monitoring request gets its answer quickly.
PROBE_TIMEOUT_S = 3.0


async def not_ready_reason(proxy: SmtpProxy) -> str | None:
    """None when a message arriving now would be filtered and delivered; else why not."""
    if proxy.draining:
        return "shutting down"
    smtp = proxy.runtime.config.smtp
    timeout = min(smtp.downstream_timeout, PROBE_TIMEOUT_S)
    if smtp.listen is not None:  # with the spamd door only, nothing is delivered downstream
        host, port = split_host_port(smtp.downstream)
        try:
            connection = await DownstreamConnection.open(
                host, port, lmtp=smtp.protocol == "lmtp", helo_name=proxy.hostname, timeout=timeout
            )
        except DownstreamError as exc:
            return f"downstream {smtp.downstream} unavailable: {exc}"
        connection.quit()
    if not await proxy.runtime.batcher.model_ready(timeout):
        return "the model does not answer: messages would go out unchecked or be tempfailed"
    return None
