"""Messages as a consumer queues them, and how it cuts them into apply groups.

A group never ends inside an origin's publish batch: messages marked "more follows"
(``Harmonylite-More``) are held until their origin's batch ends on this stream, so what one
transaction wrote becomes visible in one transaction (messages of other origins in between are
applied with them). When nothing arrives for ``HOLD_IDLE`` seconds while a batch is open (its
node stopped while publishing), or the held messages pass ``HOLD_MAX_BYTES``, what came is
applied, and a warning says so.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import NamedTuple

from harmonylite.replication.spool import Payload, held_bytes

# The consumer's logger: these lines are the consumer's own, as operators know them.
log = logging.getLogger("harmonylite.replication.consumer")

MAX_GROUP = 2000
# A publisher sends a batch's messages back to back (acknowledged in milliseconds); this long
# without the next part means it stopped mid-batch: what came is applied.
HOLD_IDLE = 10.0
HOLD_MAX_BYTES = 256 * 1024 * 1024  # a batch held whole up to this many bytes of messages


class Queued(NamedTuple):
    seq: int
    data: Payload
    at: float  # JetStream time (epoch seconds)
    origin: str = ""  # the publishing database (node:epoch), when the message says
    more: bool = False  # more of the origin's batch follows on this stream


async def gather(group: list[Queued], first: Queued, preloaded: deque[Queued],
                 queue: asyncio.Queue[Queued], stop: asyncio.Event,
                 stream: str) -> list[Queued] | None:
    """Fill ``group`` from ``first`` on: what is preloaded or queued (up to ``MAX_GROUP``), and
    further until no origin's batch is open in it. None when stopped while waiting: nothing is
    applied now (the messages stay in ``group``, which the caller holds)."""
    open_: dict[str, int] = {}  # origins whose batch is not ended yet -> its first sequence
    size = 0

    def take(m: Queued) -> None:
        nonlocal size
        group.append(m)
        size += held_bytes(m.data)
        if m.more:
            open_.setdefault(m.origin, m.seq)
        else:
            open_.pop(m.origin, None)

    take(first)
    while True:
        while (len(group) < MAX_GROUP or open_) and (preloaded or not queue.empty()):
            take(preloaded.popleft() if preloaded else queue.get_nowait())
        if not open_:
            return group
        if size > HOLD_MAX_BYTES:
            _part_applied(stream, open_, f"it passed {HOLD_MAX_BYTES} bytes of messages")
            return group
        get = asyncio.create_task(queue.get())
        halt = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({get, halt}, timeout=HOLD_IDLE,
                                     return_when=asyncio.FIRST_COMPLETED)
        halt.cancel()
        if get in done:
            take(get.result())
            continue
        get.cancel()
        if halt in done:
            return None
        _part_applied(stream, open_, f"nothing came for {HOLD_IDLE:.0f} s (its node stopped "
                      "while publishing?)")
        return group


def _part_applied(stream: str, open_: dict[str, int], why: str) -> None:
    for origin, seq in open_.items():
        log.warning("%s: the batch of origin %s from sequence %d is applied as far as it "
                    "came, not as one transaction: %s", stream, origin, seq, why,
                    extra={"stream": stream, "sequence": seq})
