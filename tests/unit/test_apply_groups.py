"""How a consumer cuts its queue into apply groups: never inside an origin's publish batch."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from harmonylite.replication import cut_hold, groups
from harmonylite.replication.consumer import ShardConsumer
from harmonylite.replication.groups import Queued


def make(tmp_path: Path) -> ShardConsumer:
    writer = SimpleNamespace(path=tmp_path / "d.db")  # nothing is applied here
    return ShardConsumer(js=Any, stream="s-1", subject="s-1", writer=writer,  # type: ignore[arg-type]
                         applier=Any, position=0,  # type: ignore[arg-type]
                         on_applied=lambda *_: None)


def q(seq: int, origin: str = "", more: bool = False) -> Queued:
    return Queued(seq, b"x", 0.0, origin, more)


async def test_a_group_waits_for_the_end_of_each_open_batch(tmp_path: Path) -> None:
    c = make(tmp_path)
    stop = asyncio.Event()
    for m in (q(2, "1:a", more=True), q(3, "2:b"), q(4, "1:a", more=True)):
        c._queue.put_nowait(m)
    gather = asyncio.create_task(c._gather(q(1, "1:a", more=True), stop))
    await asyncio.sleep(0.05)
    assert not gather.done()  # node 1's batch is still open: more of it follows
    c._queue.put_nowait(q(5, "1:a"))  # its end
    c._queue.put_nowait(q(6, "3:c", more=True))  # already queued: taken, then waited for
    await asyncio.sleep(0.05)
    assert not gather.done()
    c._queue.put_nowait(q(7, "3:c"))
    group = await asyncio.wait_for(gather, 5)
    assert [m.seq for m in group] == [1, 2, 3, 4, 5, 6, 7]


async def test_a_batch_whose_end_never_comes_is_applied_as_far_as_it_came(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(groups, "HOLD_IDLE", 0.2)
    c = make(tmp_path)
    c._queue.put_nowait(q(2, "1:a", more=True))
    with caplog.at_level(logging.WARNING):
        group = await asyncio.wait_for(c._gather(q(1, "1:a", more=True), asyncio.Event()), 5)
    assert [m.seq for m in group] == [1, 2]
    assert "the batch of origin 1:a from sequence 1 is applied as far as it came" in caplog.text


async def test_messages_without_the_headers_group_as_before(tmp_path: Path) -> None:
    c = make(tmp_path)
    for seq in range(2, 6):
        c._queue.put_nowait(q(seq))
    group = await asyncio.wait_for(c._gather(q(1), asyncio.Event()), 5)
    assert [m.seq for m in group] == [1, 2, 3, 4, 5]


async def test_stopping_while_waiting_applies_nothing(tmp_path: Path) -> None:
    c = make(tmp_path)
    stop = asyncio.Event()
    gather = asyncio.create_task(c._gather(q(1, "1:a", more=True), stop))
    await asyncio.sleep(0.05)
    stop.set()
    assert await asyncio.wait_for(gather, 5) is None


async def test_messages_past_a_hold_wait_until_the_others_caught_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cut_hold, "CUT_POLL", 0.01)
    c = make(tmp_path)
    behind = ["s-2 up to 9 (at 3)"]
    c.hold = cut_hold.Hold(2, lambda: list(behind))
    applied: list[list[int]] = []

    async def apply_now(group: list[Queued], stop: asyncio.Event) -> None:
        applied.append([m.seq for m in group])
        c.position = group[-1].seq

    monkeypatch.setattr(c, "_apply_now", apply_now)
    run = asyncio.create_task(c._apply([q(1), q(2), q(3), q(4)], asyncio.Event()))
    await asyncio.sleep(0.1)
    assert applied == [[1, 2]] and not run.done()  # up to the hold, then waiting
    assert c.stalled is not None and "s-2 up to 9" in c.stalled
    behind.clear()
    await asyncio.wait_for(run, 5)
    assert applied == [[1, 2], [3, 4]] and c.hold is None and c.stalled is None
