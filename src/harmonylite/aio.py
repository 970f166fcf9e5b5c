"""Small asyncio helpers shared by the node's long-running loops."""

from __future__ import annotations

import asyncio


async def wait_any(*events: asyncio.Event | None, timeout: float | None = None) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds (None: no limit)."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events if e is not None]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class Backoff:
    """The retry policy of the node's loops: wait ``first`` seconds after a failure, twice as
    long after each further one, never more than ``most``; back to ``first`` after a success.

    Each loop keeps its own words for what failed (said once per outage); this keeps the timing.
    """

    def __init__(self, first: float, most: float) -> None:
        self.first = first
        self.most = most
        self.delay = first  # the next wait

    def reset(self) -> None:
        """A success: the next failure waits ``first`` again."""
        self.delay = self.first

    async def wait(self, *events: asyncio.Event | None, spent: float = 0.0) -> None:
        """Wait the next delay, less the ``spent`` seconds the failed attempt took (never less
        than ``first``), or until one of ``events`` is set; the delay after doubles."""
        delay = max(self.first, self.delay - spent)
        self.delay = min(self.delay * 2, self.most)
        if any(e is not None for e in events):
            await wait_any(*events, timeout=delay)
        else:
            await asyncio.sleep(delay)
