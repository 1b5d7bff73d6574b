"""Micro-batching: messages that arrive together are scored in one model call, off the event loop.

A forward pass over a batch of 8 costs little more than over one message. A message that finds
a worker idle is scored at once (with whatever arrived in the same loop turn): waiting for
companions that are not coming only adds latency, which a spamc or thin-client caller feels.
While every worker is busy, messages gather until one is free, `batch_size` are queued, or
`batch_wait_ms` has passed, and the batch goes to `engine.check_many` on a small, bounded
thread pool. The event loop keeps serving meanwhile; each caller waits at most `timeout`
seconds for its own result.

Work that needs no model — a GTUBE test message, the `unchecked` header rewrite after a
classifier failure — runs on a pool of its own, so a stuck or slow model never holds it up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from spamfilterd.engine import GTUBE
from spamfilterd.message import Header, read_header
from spamfilterd.rules import Envelope

if TYPE_CHECKING:
    from spamfilterd.config import Config
    from spamfilterd.engine import CheckResult, FilterEngine

# What a readiness probe asks the model while the last message could not be classified.
_PROBE = read_header(b"Subject: spamfilterd readiness probe\r\n\r\nIs the model answering?\r\n")


@dataclass(frozen=True)
class Runtime:
    """What the doors score with, and what a SIGHUP swaps in one assignment: config, engine, batcher."""

    config: Config
    engine: FilterEngine
    batcher: Batcher


class ClassifierError(Exception):
    """The classifier failed or did not answer in time; the proxy applies `on_classifier_error`."""


@dataclass
class _Pending:
    message: Header
    envelope: Envelope
    future: asyncio.Future = field(repr=False)


class Batcher:
    """Collects concurrent `check` calls into `engine.check_many` batches on `workers` threads."""

    def __init__(
        self,
        engine: FilterEngine,
        *,
        batch_size: int,
        wait_ms: int,
        workers: int,
        timeout: float,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.engine = engine
        self._batch_size = max(1, batch_size)
        self._wait = max(0, wait_ms) / 1000
        self._timeout = timeout
        self._on_batch = on_batch
        self._workers = max(1, workers)
        self._busy = 0  # batches handed to the pool and not finished yet
        self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="classify")
        self._direct = ThreadPoolExecutor(max_workers=1, thread_name_prefix="no-model")
        self._pending: list[_Pending] = []
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self.model_failing = False  # the last message the model was asked about got no answer
        self._probe: asyncio.Future | None = None

    async def check(self, message: Header, envelope: Envelope) -> CheckResult:
        """Classify one message with whatever else is queued; ClassifierError on failure or timeout.
        The doors read the header block (`read_header`) and the engine uses that reading."""
        if GTUBE in message.raw:  # decided before and without the model: a stuck model never lets it through
            return await self._gtube(message, envelope)
        try:
            result = await self._batched(message, envelope)
        except ClassifierError:
            self.model_failing = True
            raise
        self.model_failing = False
        return result

    async def _gtube(self, message: Header, envelope: Envelope) -> CheckResult:
        """`engine.check_many` on the model-free pool: it makes no model call for a GTUBE message."""
        work = asyncio.get_running_loop().run_in_executor(
            self._direct, self.engine.check_many, [message], [envelope]
        )
        try:
            async with asyncio.timeout(self._timeout):
                return (await work)[0]
        except TimeoutError as exc:
            raise ClassifierError(f"GTUBE check did not finish within {self._timeout:g} s") from exc
        except Exception as exc:  # as for a batch: the proxy applies on_classifier_error
            raise ClassifierError(f"GTUBE check failed: {exc!r}") from exc

    async def unchecked(self, message: Header) -> bytes:
        """`engine.unchecked(message)` off the event loop, on the pool the model never occupies."""
        return await asyncio.get_running_loop().run_in_executor(self._direct, self.engine.unchecked, message)

    async def model_ready(self, timeout: float) -> bool:
        """True unless the model failed on the last message and does not answer a probe within
        `timeout` s now; one probe at a time, so a hung model does not collect a queue of them."""
        if not self.model_failing:
            return True
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self.check(_PROBE, Envelope()))
            self._probe.add_done_callback(_retrieve)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._probe)
        except (TimeoutError, ClassifierError):
            return False
        return True

    async def _batched(self, message: Header, envelope: Envelope) -> CheckResult:
        loop = asyncio.get_running_loop()
        item = _Pending(message, envelope, loop.create_future())
        self._pending.append(item)
        if len(self._pending) >= self._batch_size:
            self._flush()
        elif self._timer is None:
            idle = self._busy < self._workers
            self._timer = loop.call_soon(self._flush) if idle else loop.call_later(self._wait, self._flush)
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(item.future)
        except TimeoutError as exc:
            raise ClassifierError(f"classifier did not answer within {self._timeout:g} s") from exc
        finally:
            item.future.cancel()  # no-op when answered; else the batch's late result is dropped

    def close(self) -> None:
        """Let queued batches finish in the background; take no new ones. The model-free pool stays
        open for messages still finishing here (their `unchecked` rewrite) and ends with the batcher."""
        self._flush()
        self._pool.shutdown(wait=False)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        # `check` flushes as soon as `batch_size` are queued, so the queue is never larger.
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._on_batch is not None:
            self._on_batch(len(batch))
        loop = asyncio.get_running_loop()
        try:
            work = loop.run_in_executor(
                self._pool, _check_each, self.engine, [p.message for p in batch], [p.envelope for p in batch]
            )
        except RuntimeError as exc:  # the pool was shut down (a reload raced with this batch)
            work = loop.create_future()
            work.set_exception(exc)
        self._busy += 1
        work.add_done_callback(lambda done: self._finished(batch, done))

    def _finished(self, batch: list[_Pending], done: asyncio.Future) -> None:
        self._busy -= 1
        _deliver(batch, done)
        if self._pending and self._busy < self._workers:  # what gathered meanwhile goes now
            self._flush()


def _retrieve(probe: asyncio.Future) -> None:
    """A probe's failure is answered by `model_ready`; fetch it so asyncio does not log it too."""
    if not probe.cancelled():
        probe.exception()


def _check_each(engine: FilterEngine, messages: list[Header], envelopes: list[Envelope]) -> list:
    """`engine.check_many`, but one bad message fails only itself: after a failed batch, each
    message is checked alone and gets its own result or its own ClassifierError."""
    try:
        return engine.check_many(messages, envelopes)
    except Exception:
        if len(messages) == 1:
            raise
    results: list = []
    for message, envelope in zip(messages, envelopes, strict=True):
        try:
            results.extend(engine.check_many([message], [envelope]))
        except Exception as exc:
            results.append(ClassifierError(f"classifier failed: {exc!r}"))
    return results


def _deliver(batch: list[_Pending], done: asyncio.Future) -> None:
    """Hand each caller its own result, or the batch's exception wrapped as ClassifierError."""
    error = None if done.cancelled() else done.exception()
    if done.cancelled() or error is not None:
        for item in batch:
            if not item.future.done():
                item.future.set_exception(ClassifierError(f"classifier failed: {error!r}"))
        return
    results = done.result()
    if len(results) != len(batch):
        error = ClassifierError(f"classifier returned {len(results)} results for {len(batch)} messages")
        for item in batch:
            if not item.future.done():
                item.future.set_exception(error)
        return
    for item, result in zip(batch, results, strict=True):
        if item.future.done():
            continue
        if isinstance(result, ClassifierError):
            item.future.set_exception(result)
        else:
            item.future.set_result(result)
