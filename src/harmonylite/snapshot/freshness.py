"""Whether the newest snapshot holds every change, and since when it does not.

A snapshot is as good as new while nothing has changed since it: an idle database keeps its
newest snapshot for days, and the leader rightly takes no other (``SnapshotUnchanged``). What
ages is a change that no snapshot holds: recovery from the newest snapshot would then need the
streams to still hold that change. So health and ``snapshot_staleness_seconds`` count from the
first change the newest snapshot lacks:

- a stream that moved past the snapshot's sequence for it: the time JetStream stored the first
  message after it (read once per snapshot and stream; while that cannot be read, or when the
  stream dropped it, the time this node first saw the stream past the snapshot);
- a local change not published yet (NATS unreachable, publishing failing): the time the
  publisher first failed to publish it.

Every node with the snapshot service keeps this, leader or not, from the newest snapshot it knows
(:class:`Scheduler`) and the stream heads its consumers see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from harmonylite.aio import wait_any
from harmonylite.snapshot.manifest import Manifest

log = logging.getLogger(__name__)

CHECK_EVERY = 1.0  # seconds between looks at the heads (in memory) and the stream times
LOOKUP_TIMEOUT = 5.0


class Freshness:
    def __init__(self, js: JetStreamContext, *, newest: Callable[[], Manifest | None],
                 heads: Callable[[], dict[str, int]],
                 local_since: Callable[[], float | None] = lambda: None,
                 clock: Callable[[], float] = time.time) -> None:
        self.js = js
        self._newest = newest
        self._heads = heads
        self._local_since = local_since
        self._clock = clock
        self._snapshot: str | None = None  # the snapshot the times below are for
        self._first: dict[str, float] = {}  # stream -> time of its first change after it
        self._to_read: set[str] = set()  # streams whose time is only an observation so far

    def _follow(self, newest: Manifest) -> None:
        """Note each stream that moved past ``newest`` (and forget what an older one lacked)."""
        if newest.id != self._snapshot:
            self._snapshot = newest.id
            self._first.clear()
            self._to_read.clear()
        now = self._clock()
        for stream, head in self._heads().items():
            if head > newest.sequences.get(stream, 0) and stream not in self._first:
                self._first[stream] = now
                self._to_read.add(stream)

    def state(self) -> tuple[bool, float | None]:
        """``(known, since)``: ``known`` is False until a snapshot is known; ``since`` is the
        Unix time of the first change the newest snapshot lacks, None when it lacks none."""
        newest = self._newest()
        if newest is None:
            return False, None
        self._follow(newest)
        times = list(self._first.values())
        local = self._local_since()
        if local is not None:
            times.append(local)
        return True, min(times) if times else None

    async def _read_times(self, newest: Manifest) -> None:
        """Replace observations by the time JetStream stored the first message past the
        snapshot (this node may have started, or learnt of the snapshot, long after it)."""
        for stream in sorted(self._to_read):
            seq = newest.sequences.get(stream, 0) + 1
            try:
                msg = await asyncio.wait_for(self.js.get_msg(stream, seq), LOOKUP_TIMEOUT)
            except NotFoundError:
                # Dropped by the stream already: the observation is the best time there is.
                self._to_read.discard(stream)
                continue
            except Exception as exc:  # tried again at the next look
                log.debug("cannot read message %d of %s: %s", seq, stream, exc)
                continue
            if self._snapshot != newest.id or stream not in self._first:
                return  # a newer snapshot came meanwhile
            if msg.time is not None:
                self._first[stream] = min(self._first[stream], msg.time.timestamp())
            self._to_read.discard(stream)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.state()
            newest = self._newest()
            if newest is not None and self._to_read and newest.id == self._snapshot:
                await self._read_times(newest)
            await wait_any(stop, timeout=CHECK_EVERY)
