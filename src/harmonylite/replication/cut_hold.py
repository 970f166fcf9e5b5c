"""Holding a stream's messages at a shard-count cut until the other streams caught up.

After the shard count changed, a row's changes may sit on an old stream and a new one: each
stream is applied up to the cut, and what follows it waits until every other stream reached
its part of the cut, so a row's older changes are applied first, on every node alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

from harmonylite.aio import wait_any

# The consumer's logger: these lines are the consumer's own, as operators know them.
log = logging.getLogger("harmonylite.replication.consumer")

CUT_POLL = 0.2  # how often a consumer held at a cut looks at the other streams' positions


class Hold(NamedTuple):
    """Where a consumer stops until others caught up: after sequence ``after`` of its stream,
    until ``behind()`` (what is not caught up yet, described) is empty."""
    after: int
    behind: Callable[[], list[str]]


async def wait_at_cut(hold: Hold, stream: str, stop: asyncio.Event,
                      stalled: Callable[[str | None, float | None], None]) -> bool:
    """Wait until nothing is behind ``hold`` (True) or ``stop`` (False). Meanwhile
    ``stalled(why, since)`` says what is waited for; ``stalled(None, None)`` once it is over."""
    behind = hold.behind()
    if not behind:
        return True
    since = time.monotonic()
    log.info("%s: holding messages after sequence %d until %s (the shard count changed: "
             "a row's older changes are applied first)", stream, hold.after,
             ", ".join(behind), extra={"stream": stream})
    while behind:
        stalled("waiting for " + ", ".join(behind) + " (shard count changed)", since)
        await wait_any(stop, timeout=CUT_POLL)  # a poll period: positions move elsewhere
        if stop.is_set():
            return False
        behind = hold.behind()
    log.info("%s: applying after sequence %d again", stream, hold.after,
             extra={"stream": stream})
    stalled(None, None)
    return True
