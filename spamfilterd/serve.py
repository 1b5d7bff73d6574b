"""`spamfilterd serve`: the daemon's life cycle — load, listen, tell systemd, reload, drain, exit.

The model is loaded before the socket opens, so a client never meets a proxy that cannot
classify; systemd learns of readiness by sd_notify (`Type=notify`), written here with a plain
datagram socket rather than a new dependency.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from spamfilterd import __version__
from spamfilterd.batcher import Batcher, Runtime
from spamfilterd.config import (
    EXIT_CONFIG_ERROR,
    Config,
    ConfigError,
    LoggingConfig,
    load_config,
    split_host_port,
)
from spamfilterd.http import HealthServer, Metrics
from spamfilterd.logformat import JsonFormatter, LogfmtFormatter
from spamfilterd.readiness import not_ready_reason
from spamfilterd.smtp import ProxyHandler
from spamfilterd.smtp_server import QuarantineError, SmtpProxy
from spamfilterd.spamd import SpamdServer

if TYPE_CHECKING:
    from spamfilterd.engine import FilterEngine

log = logging.getLogger(__name__)

EXIT_FAILURE = 1
# After SIGTERM, sessions in the middle of a message get this long beyond the per-message
# deadline to finish; systemd's TimeoutStopSec must be longer (the unit uses 180 s).
DRAIN_MARGIN_S = 10.0


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to systemd if it asked for notifications; never raises."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
    except OSError as exc:
        log.warning("sd_notify to %s failed: %s", address, exc)
        return False
    return True


def setup_logging(config: LoggingConfig) -> None:
    """Log to stderr (journald under systemd, which adds its own timestamps)."""
    handler = logging.StreamHandler(sys.stderr)
    if config.format == "json":
        handler.setFormatter(JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(LogfmtFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(LogfmtFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.level)
    # aiosmtpd logs every command (addresses included) at INFO; we log one line per message.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, root.level))


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


def smtp_proxy(runtime: Runtime, metrics: Metrics, hostname: str | None = None) -> SmtpProxy:
    """The SMTP/LMTP door: the listener, with one handler for all its connections."""
    return SmtpProxy(runtime, metrics, ProxyHandler(), hostname)


class Daemon:
    """Owns the running doors (SMTP proxy, spamd), the health endpoint and the config; reacts to signals.

    The SMTP proxy object holds the runtime even when `smtp.listen` is off; the spamd door reads
    it from there, so one SIGHUP swaps the model for both doors.
    """

    def __init__(self, config_path: Path | None, model_path: Path | None, runtime: Runtime, metrics: Metrics):
        self.config_path = config_path
        self.model_path = model_path
        self.metrics = metrics
        self.proxy = smtp_proxy(runtime, metrics)
        self.spamd = SpamdServer(lambda: self.proxy.runtime, metrics)
        self.health = HealthServer(metrics, readiness=lambda: not_ready_reason(self.proxy))
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()

    @property
    def config(self) -> Config:
        return self.proxy.runtime.config

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        doors = []
        if self.config.smtp.listen:  # the downstream probe concerns the SMTP door only
            try:
                await self.proxy.verify(self.config)
            except QuarantineError as exc:
                log.error("%s", exc)
                return EXIT_CONFIG_ERROR
        try:
            if self.config.smtp.listen:
                bound = await self.proxy.start(*split_host_port(self.config.smtp.listen))
                protocol = self.config.smtp.protocol.upper()
                doors.append(f"{protocol} on {bound[0]}:{bound[1]} relaying to {self.config.smtp.downstream}")
            if self.config.spamd.listen:
                spamd_bound = await self.spamd.start(self.config.spamd.listen, self.config.spamd.socket_mode)
                doors.append(f"spamd protocol on {', '.join(spamd_bound)}")
            if self.config.http.listen:
                http_bound = await self.health.start(*split_host_port(self.config.http.listen))
                log.info("health and metrics on http://%s:%d/", *http_bound)
        except OSError as exc:  # typically: the address is in use or not ours to bind
            log.error(
                "cannot listen (smtp.listen %s, spamd.listen %s, http.listen %s): %s",
                self.config.smtp.listen,
                ", ".join(self.config.spamd.listen) or "off",
                self.config.http.listen,
                exc,
            )
            await self.spamd.shutdown(0)
            return EXIT_FAILURE
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        self.metrics.model_id = self.proxy.runtime.engine.model_id
        self.metrics.ready = True
        serving = "; ".join(doors)
        log.info("spamfilterd %s serving %s, model %s", __version__, serving, self.metrics.model_id)
        sd_notify(f"READY=1\nSTATUS=serving {serving}\nMAINPID={os.getpid()}")
        await self._stop.wait()

        sd_notify("STOPPING=1")
        self.metrics.ready = False
        grace = self.config.smtp.data_timeout + DRAIN_MARGIN_S
        log.info("stopping: no new connections, finishing open transactions (up to %.0f s)", grace)
        clean_spamd, clean_smtp = await asyncio.gather(self.spamd.shutdown(grace), self.proxy.shutdown(grace))
        clean = clean_spamd and clean_smtp
        if not clean:
            log.warning("cut sessions still open after %.0f s; their clients got no reply, will retry", grace)
        await self.health.close()
        self.proxy.runtime.batcher.close()
        log.info("stopped")
        return 0

    def _spawn_reload(self) -> None:
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """Re-read the config file and load its model off the loop; swap only if both are good."""
        async with self._reload_lock:
            monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            sd_notify(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")
            log.info("reloading %s", self.config_path or self.config.source or "the default config")
            try:
                config = await asyncio.to_thread(load_config, self.config_path, self.model_path)
                runtime = await asyncio.to_thread(build_runtime, config, self.metrics)
                if config.smtp.listen:  # the downstream probe concerns the SMTP door only
                    await self.proxy.verify(config)
            except Exception as exc:  # any failure must leave the running config and model serving
                self.metrics.reloads["failed"] += 1
                log.error("reload failed, still serving the previous config and model: %s", exc)
                return False
            finally:
                sd_notify("READY=1")
            self._warn_restart_only(config)
            old = self.proxy.swap(runtime)
            old.batcher.close()
            setup_logging(config.logging)
            self.metrics.model_id = runtime.engine.model_id
            self.metrics.reloads["ok"] += 1
            log.info("reloaded: model %s, %d rules", runtime.engine.model_id, len(config.rules))
            return True

    def _warn_restart_only(self, new: Config) -> None:
        for name, before, after in (
            ("smtp.listen", self.config.smtp.listen, new.smtp.listen),
            ("spamd.listen", self.config.spamd.listen, new.spamd.listen),
            ("spamd.socket_mode", self.config.spamd.socket_mode, new.spamd.socket_mode),
            ("http.listen", self.config.http.listen, new.http.listen),
        ):
            if before != after:
                log.warning("%s changed (%s -> %s): takes effect only after a restart", name, before, after)


@click.command("serve")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file, re-read on SIGHUP (default: $SPAMFILTERD_CONFIG, /etc/spamfilterd/config.yaml).",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(path_type=Path),
    help="Checkpoint directory or file; overrides model.checkpoint (also on reload).",
)
def serve(config_path: Path | None, model_path: Path | None) -> None:
    """Run the SMTP/LMTP proxy and the spamd door (README): SIGHUP reloads, SIGTERM stops."""
    try:
        config = load_config(config_path, model_path)
    except ConfigError as exc:
        click.echo(f"spamfilterd: error: {exc}", err=True)
        sys.exit(EXIT_CONFIG_ERROR)
    setup_logging(config.logging)
    # Until the event loop takes over SIGHUP, a reload request must not kill a starting daemon.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    metrics = Metrics()
    log.info("loading model %s", config.model.checkpoint)
    try:
        runtime = build_runtime(config, metrics)
    except Exception as exc:  # damaged checkpoint, no GPU, out of memory: say what and where
        log.error("cannot load the model %s: %s", config.model.checkpoint, exc)
        sys.exit(EXIT_FAILURE)
    daemon = Daemon(config_path, model_path, runtime, metrics)
    code = asyncio.new_event_loop().run_until_complete(daemon.run())
    # The drain in Daemon.run is bounded. A worker thread still busy in the model (or a reload)
    # holds nothing to save; waiting for it, as interpreter exit and asyncio.run would, could take
    # forever and break the promise to stop within data_timeout + 10 s.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
