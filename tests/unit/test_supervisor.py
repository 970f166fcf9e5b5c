"""The supervisor restarts a task that raises, and reports one that keeps failing."""

from __future__ import annotations

import asyncio
import logging

import pytest

from harmonylite.node.supervisor import FAILING_AFTER, Supervisor


async def test_a_task_that_raises_is_restarted_and_reported_while_it_keeps_failing(
        caplog: pytest.LogCaptureFixture) -> None:
    stop = asyncio.Event()
    sup = Supervisor(stop, first_backoff=0.01, max_backoff=0.02)
    runs: list[int] = []
    healed = asyncio.Event()

    async def flaky() -> None:
        runs.append(1)
        if len(runs) <= FAILING_AFTER:
            raise RuntimeError(f"boom {len(runs)}")
        healed.set()
        await stop.wait()

    with caplog.at_level(logging.ERROR):
        sup.spawn("flaky", flaky)
        await asyncio.wait_for(healed.wait(), 5)
    assert len(runs) == FAILING_AFTER + 1
    assert sup.problems() == [f"task flaky keeps failing ({FAILING_AFTER} times in a row): "
                              f"RuntimeError: boom {FAILING_AFTER}"]
    assert sum("task flaky failed" in r.getMessage() for r in caplog.records) == FAILING_AFTER
    assert all(r.exc_info for r in caplog.records if "task flaky failed" in r.getMessage())
    stop.set()
    await asyncio.wait_for(sup.wait(), 5)


async def test_a_task_that_returns_early_is_started_again() -> None:
    stop = asyncio.Event()
    sup = Supervisor(stop, first_backoff=0.01)
    runs: list[int] = []
    again = asyncio.Event()

    async def quits() -> None:
        runs.append(1)
        if len(runs) == 2:
            again.set()
            await stop.wait()

    sup.spawn("quits", quits)
    await asyncio.wait_for(again.wait(), 5)
    stop.set()
    await asyncio.wait_for(sup.wait(), 5)
    assert len(runs) == 2
