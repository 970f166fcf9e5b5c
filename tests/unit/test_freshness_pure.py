"""Since when the newest snapshot lacks a change (snapshot.freshness), with a fake JetStream."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from nats.js.errors import NotFoundError

from harmonylite.snapshot.freshness import Freshness
from harmonylite.snapshot.manifest import Manifest


class Clock:
    def __init__(self) -> None:
        self.now = 1_750_000_000.0

    def __call__(self) -> float:
        return self.now


class FakeJs:
    """Stored times of messages by (stream, seq); anything else is gone from the stream."""

    def __init__(self, times: dict[tuple[str, int], float]) -> None:
        self.times = times
        self.asked: list[tuple[str, int]] = []
        self.answered = asyncio.Event()

    async def get_msg(self, stream: str, seq: int) -> Any:
        self.asked.append((stream, seq))
        self.answered.set()
        if (stream, seq) not in self.times:
            raise NotFoundError()

        class Msg:
            time = datetime.fromtimestamp(self.times[(stream, seq)], UTC)

        return Msg()


def manifest(snapshot_id: str, sequences: dict[str, int]) -> Manifest:
    return Manifest(id=snapshot_id, node_id=1, created_at="2025-06-15T00:00:00Z", db_bytes=1,
                    db_sha256="0" * 64, stored_bytes=1, stored_sha256="0" * 64,
                    compression="none", sequences=sequences)


def test_idle_then_a_change_then_a_snapshot_that_holds_it() -> None:
    clock = Clock()
    heads = {"s-1": 5, "s-2": 3}
    newest: dict[str, Manifest | None] = {"m": None}
    js = FakeJs({})
    fresh = Freshness(js, newest=lambda: newest["m"], heads=lambda: dict(heads), clock=clock)
    assert fresh.state() == (False, None)  # no snapshot known
    newest["m"] = manifest("a", {"s-1": 5, "s-2": 3})
    assert fresh.state() == (True, None)  # idle: nothing lacking
    clock.now += 3600
    assert fresh.state() == (True, None)
    heads["s-1"] = 7  # a change: first seen now, stored 30 s earlier
    js.times[("s-1", 6)] = clock.now - 30
    assert fresh.state() == (True, clock.now)
    stop = asyncio.Event()

    async def one_round() -> None:
        task = asyncio.create_task(fresh.run(stop))
        await js.answered.wait()
        stop.set()
        await task

    asyncio.run(one_round())
    assert js.asked == [("s-1", 6)]
    assert fresh.state() == (True, clock.now - 30)
    newest["m"] = manifest("b", {"s-1": 7, "s-2": 3})  # a snapshot holding it
    assert fresh.state() == (True, None)


def test_unpublished_local_change_counts() -> None:
    clock = Clock()
    local: dict[str, float | None] = {"t": None}
    fresh = Freshness(FakeJs({}), newest=lambda: manifest("a", {"s-1": 1}),
                      heads=lambda: {"s-1": 1}, local_since=lambda: local["t"], clock=clock)
    assert fresh.state() == (True, None)
    local["t"] = clock.now - 12
    assert fresh.state() == (True, clock.now - 12)


def test_message_gone_from_the_stream_keeps_the_observed_time() -> None:
    clock = Clock()
    js = FakeJs({})
    fresh = Freshness(js, newest=lambda: manifest("a", {}), heads=lambda: {"s-1": 4},
                      clock=clock)
    seen = clock.now
    assert fresh.state() == (True, seen)
    clock.now += 5
    stop = asyncio.Event()

    async def one_round() -> None:
        task = asyncio.create_task(fresh.run(stop))
        await js.answered.wait()
        stop.set()
        await task

    asyncio.run(one_round())
    assert js.asked == [("s-1", 1)]
    assert fresh.state() == (True, seen)
