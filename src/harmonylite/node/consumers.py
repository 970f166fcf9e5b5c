"""The node's consumers: one per stream it reads (each shard's, and retired ones still there),
held at the last shard-count change's cut until every old stream is applied up to it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.cdc import origin
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.node.progress import Progress
from harmonylite.node.settings_change import Cut
from harmonylite.replication.apply import Applier
from harmonylite.replication.consumer import ShardConsumer, near_head
from harmonylite.replication.cut_hold import Hold
from harmonylite.replication.read_ahead import ReadAhead

log = logging.getLogger(__name__)

Spawn = Callable[[str, Callable[[asyncio.Event], Awaitable[None]]], None]


class Consumers:
    def __init__(self, cfg: Config, writer: DbThread, progress: Progress, spawn: Spawn) -> None:
        self.cfg, self.writer, self.progress, self._spawn = cfg, writer, progress, spawn
        self.all: list[ShardConsumer] = []  # the same list for the node's life
        self.cut: Cut | None = None  # the last shard-count change's cut, held at until passed
        self._consumed: set[str] = set()

    async def start(self, js: JetStreamContext, applier: Applier, cut: dict[str, int],
                    retired: dict[str, str], read_ahead: dict[str, ReadAhead]) -> None:
        """Subscribe to every stream, after what was read ahead of each (``read_ahead``)."""
        cfg, progress = self.cfg, self.progress
        # Past the last shard-count change's cut, each stream waits until every old stream
        # is applied up to it: a row's old changes first, on every node alike.
        self.cut = Cut(cut, progress.positions, lambda: progress.gaps)
        self._consumed = {*namespace(cfg).streams(), *retired}
        behind = self.cut.waiting_for(self._consumed)
        if behind:
            log.info("the shard count changed: applying %s before anything newer",
                     ", ".join(behind))
        if cut:
            floor = await self.writer.call(lambda c: origin.cut_floor(c, cut, bool(behind)))
            applier.after_cut(cut, floor)
        for stream, subject in namespace(cfg).subjects().items():
            await self._consume(js, stream, subject, applier, read_ahead)
        for stream, subject in retired.items():
            # A shard count changed cluster-wide: nodes still on the old one may write here
            # until restarted, and this node may not have read all it holds.
            log.info("reading retired stream %s too (shard count changed)", stream)
            await self._consume(js, stream, subject, applier, read_ahead)

    async def _consume(self, js: JetStreamContext, stream: str, subject: str, applier: Applier,
                       read_ahead: dict[str, ReadAhead]) -> None:
        consumer = ShardConsumer(js, stream, subject, self.writer, applier,
                                 self.progress.positions.get(stream, 0), self.progress.applied,
                                 on_gap=self.progress.gap_found,
                                 near_head=near_head(self.cfg.replication_log.max_entries),
                                 hold=self._hold(stream))
        reader = read_ahead.pop(stream, None)
        if reader is not None:
            # Subscribe after the last message read ahead, then stop reading ahead: nothing
            # falls between the two however fast the stream rolls over.
            consumer.preload(reader.take_after(consumer.position))
        await consumer.subscribe_with_retry()
        if reader is not None:
            await reader.stop()
        self.all.append(consumer)
        self._spawn(f"consumer {stream}", consumer.run)
        # Re-creates the subscription whenever it is lost (server gone, leader change).
        self._spawn(f"subscription {stream}", consumer.keep)

    def _hold(self, stream: str) -> Hold | None:
        cut, consumed = self.cut, self._consumed
        if cut is None or not cut.waiting_for(consumed):
            return None
        return Hold(cut.after(stream), lambda: cut.waiting_for(consumed))

    async def resubscribe(self) -> None:
        # Each consumer's keeper re-creates its subscription, retrying until it works: a cluster
        # that just lost the server we were on may need seconds to elect the streams' leaders.
        for consumer in self.all:
            consumer.resubscribe()

    async def unsubscribe(self) -> None:
        for consumer in self.all:
            await consumer.unsubscribe()
