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
