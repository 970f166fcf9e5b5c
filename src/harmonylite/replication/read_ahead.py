"""Reading a stream ahead of a restore, so the messages after the snapshot are still there.

A node that must restore (it is new, or the streams dropped what it had not applied) needs every
message after the snapshot it installs. Under heavy writes and a short retention the streams may
drop those while the snapshot is captured, downloaded and installed, which no timing of the
restore can beat. So the restoring node starts reading each stream as soon as it knows it must
restore: a :class:`ReadAhead` keeps every message from where it started, in order and in memory,
until the node's consumer takes them over (:meth:`ReadAhead.take_after`). A snapshot then covers
the node when its sequence + 1 is inside what the read-ahead holds, not only inside what the
stream still holds; the read-ahead keeps running until the consumer subscribes after the last
message handed over, so nothing falls between the two.

Memory is bounded (``max_bytes``): past it the oldest messages are dropped and the window starts
later, which only asks for a newer snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from pathlib import Path

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from harmonylite.replication import large_changes
from harmonylite.replication.event import MORE_HEADER, ORIGIN_HEADER
from harmonylite.replication.groups import Queued
from harmonylite.replication.spool import Spooled, held_bytes

log = logging.getLogger(__name__)

MAX_BYTES = 64 * 1024 * 1024
INFO_TIMEOUT = 5.0


class ReadAhead:
    """Every message of ``stream`` from ``start`` on, kept until taken over."""

    def __init__(self, js: JetStreamContext, stream: str, subject: str, start: int,
                 spool: Path | None = None, max_bytes: int = MAX_BYTES) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.first = max(1, start)  # the window: every message from here to ``last`` is held
        self.last = self.first - 1
        self.max_bytes = max_bytes
        self._spool = spool  # large changes wait in files there (the database's directory)
        self._held: deque[Queued] = deque()
        self._bytes = 0
        self._sub: Subscription | None = None

    async def start(self) -> ReadAhead:
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             opt_start_seq=self.first)
        self._sub = await self.js.subscribe(
            self.subject, stream=self.stream, cb=self._on_msg, ordered_consumer=True,
            config=cfg, idle_heartbeat=2.0, pending_msgs_limit=-1, pending_bytes_limit=-1)
        # The first message may have been dropped between reading the head and subscribing:
        # then the window starts at what the stream still holds.
        info = await asyncio.wait_for(self.js.stream_info(self.stream), INFO_TIMEOUT)
        held_from = int(info.state.first_seq) if info.state.messages else \
            int(info.state.last_seq) + 1
        if not self._held and held_from > self.first:
            self.first = held_from
            self.last = held_from - 1
        return self

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self.last:
            return  # delivered again by the ordered consumer after a reset
        data = await large_changes.resolve(self.js, msg.data, msg.headers, self._spool)
        if seq <= self.last:
            return
        if seq > self.last + 1:
            # The stream dropped messages before they reached us: the window restarts here.
            log.debug("read-ahead of %s: messages %d..%d were dropped first; holding from %d",
                      self.stream, self.last + 1, seq - 1, seq)
            self._drop(len(self._held))
            self.first = seq
        headers = msg.headers or {}
        self._held.append(Queued(seq, data, meta.timestamp.timestamp(),
                                 headers.get(ORIGIN_HEADER, ""), headers.get(MORE_HEADER) == "1"))
        self._bytes += held_bytes(data)
        self.last = seq
        while self._bytes > self.max_bytes and len(self._held) > 1:
            self._drop(1)
            self.first = self._held[0].seq

    def _drop(self, count: int) -> None:
        for _ in range(count):
            dropped = self._held.popleft()
            self._bytes -= held_bytes(dropped.data)
            if isinstance(dropped.data, Spooled):
                dropped.data.close()

    def covers(self, position: int) -> bool:
        """Whether a node at ``position`` finds every later message here (so far)."""
        return self.first <= position + 1

    def take_after(self, position: int) -> list[Queued]:
        """The messages after ``position``, in order (empty unless :meth:`covers` it); they
        are the taker's from now on."""
        if not self.covers(position):
            return []
        while self._held and self._held[0].seq <= position:
            self._drop(1)
        taken = list(self._held)
        self._held.clear()
        self._bytes = 0
        return taken

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        self._drop(len(self._held))
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe the read-ahead of %s: %s", self.stream, exc)


async def read_ahead(js: JetStreamContext, streams: dict[str, str], starts: dict[str, int],
                     spool: Path | None = None) -> dict[str, ReadAhead]:
    """Start one :class:`ReadAhead` per stream (name -> subject) at ``starts`` (or 1)."""
    out: dict[str, ReadAhead] = {}
    try:
        for stream, subject in streams.items():
            out[stream] = await ReadAhead(js, stream, subject, starts.get(stream, 1),
                                          spool).start()
    except BaseException:
        await stop_all(out)
        raise
    return out


async def stop_all(readers: dict[str, ReadAhead]) -> None:
    for reader in readers.values():
        await reader.stop()
