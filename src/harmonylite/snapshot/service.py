"""The node's snapshot service: leadership and scheduling of snapshots.

Started by the node when ``publish`` and ``snapshot.enabled`` are both on; ``run`` lives until the
node stops, ``close`` releases what it holds (the lease is deleted, so another publisher takes over
at once). The lease is in :mod:`harmonylite.snapshot.leader`, the triggers in
:mod:`harmonylite.snapshot.scheduler`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from harmonylite.snapshot.leader import LeaderElection
from harmonylite.snapshot.scheduler import Scheduler
from harmonylite.snapshot.storage import ObjectStore, open_store

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node


class SnapshotService:
    def __init__(self, node: Node) -> None:
        self.node = node
        cfg = node.cfg
        self.election = LeaderElection(
            node.js, cfg.node_id, cfg.snapshot.leader_ttl, nc=node.nc,
            is_connected=lambda: node.nc is not None and node.nc.is_connected,
            on_change=self._leader_changed)
        self.scheduler = Scheduler(cfg, self.election, self._open_store, js=node.js,
                                   metrics=node.metrics, activity=self._activity,
                                   on_sleep=node.stop_event.set)
        node.link.on_reconnect.append(self._reconnected)

    def _leader_changed(self, is_leader: bool) -> None:
        self.node.metrics.leader_changed(is_leader)
        self.scheduler.leadership_changed(is_leader)

    async def _reconnected(self) -> None:
        self.election.wake()

    def _activity(self) -> tuple[int, int]:
        pub = self.node.publisher
        return (pub.published_total if pub is not None else 0, self.node.replicated_total)

    async def _open_store(self) -> ObjectStore:
        cfg = self.node.cfg
        return await open_store(cfg.snapshot, js=self.node.js, bucket=cfg.snapshot_bucket())

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.election.run(stop)),
                 asyncio.create_task(self.scheduler.run(stop))]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await self.scheduler.close()
        await self.election.release()
