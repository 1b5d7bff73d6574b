"""The micro-batcher: an idle classifier takes a message at once; a busy one lets messages gather."""

from __future__ import annotations

import asyncio
import threading

from spamfilterd.batcher import Batcher
from spamfilterd.message import read_header
from spamfilterd.rules import Envelope


class SlowEngine:
    """check_many that blocks until released, recording each batch it was given."""

    def __init__(self) -> None:
        self.batches: list[list[bytes]] = []
        self.release = threading.Event()

    def check_many(self, messages, envelopes):
        self.batches.append([message.raw for message in messages])
        self.release.wait(10)
        return [message.raw.upper() for message in messages]


def test_a_lone_message_is_not_held_back_by_batch_wait():
    engine = SlowEngine()
    engine.release.set()

    async def run():
        batcher = Batcher(engine, batch_size=8, wait_ms=60_000, workers=1, timeout=30)
        try:
            return await asyncio.wait_for(batcher.check(read_header(b"one"), Envelope()), 5)  # not after 60 s
        finally:
            batcher.close()

    assert asyncio.run(run()) == b"ONE"
    assert engine.batches == [[b"one"]]


def test_messages_gather_while_the_worker_is_busy_and_go_when_it_is_free():
    engine = SlowEngine()
    sizes: list[int] = []

    async def run():
        batcher = Batcher(engine, batch_size=8, wait_ms=60_000, workers=1, timeout=30, on_batch=sizes.append)
        try:
            first = asyncio.ensure_future(batcher.check(read_header(b"a"), Envelope()))
            while not engine.batches:  # the worker has taken "a" and is busy with it
                await asyncio.sleep(0.01)
            later = [read_header(m) for m in (b"b", b"c", b"d")]
            rest = [asyncio.ensure_future(batcher.check(m, Envelope())) for m in later]
            await asyncio.sleep(0.05)
            engine.release.set()
            return await asyncio.wait_for(asyncio.gather(first, *rest), 5)
        finally:
            batcher.close()

    assert asyncio.run(run()) == [b"A", b"B", b"C", b"D"]
    assert sizes == [1, 3]
