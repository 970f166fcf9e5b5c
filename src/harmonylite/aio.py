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


class Patience:
    """The other retry policy: a wait at start (a JetStream cluster electing its leaders, a store
    still forming) tried again every ``pause`` seconds until ``seconds`` have passed, then given
    up with the last error. Made inside the event loop, when the waiting starts."""

    def __init__(self, seconds: float, pause: float) -> None:
        self.seconds = seconds
        self.pause = pause
        self._end = asyncio.get_running_loop().time() + seconds

    @property
    def exhausted(self) -> bool:
        """The time is up: the caller gives up with the error in hand."""
        return asyncio.get_running_loop().time() > self._end

    async def wait(self) -> None:
        """The pause before the next try (a retry period, not a synchronisation)."""
        await asyncio.sleep(self.pause)
