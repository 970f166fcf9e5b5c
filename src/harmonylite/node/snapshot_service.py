"""The node's snapshot service: leadership and scheduling of snapshots.

Started by the node when ``publish`` and ``snapshot.enabled`` are both on; ``run`` lives until the
node stops, ``close`` releases what it holds (the lease is deleted, so another publisher takes over
at once). The lease is in :mod:`harmonylite.snapshot.leader`, the triggers in
:mod:`harmonylite.snapshot.scheduler`.

A node holds the lease (and so captures) only while it is fresh: every stream is being consumed
and applied, its head was read in the last ``HEAD_FRESH_SECONDS``, and this node is within
``max_behind`` messages of it (or was, less than ``BEHIND_GRACE_SECONDS`` ago). A node cut off
from its streams (lost consumers, a cluster without quorum, a stalled apply) would otherwise go
on snapshotting a frozen database.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from harmonylite.archive.writer import ArchiveWriter, Lease
from harmonylite.bus.connection import LinkState
from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.ops.metrics import Metrics
from harmonylite.replication.consumer import ShardConsumer, near_head
from harmonylite.snapshot.freshness import Freshness
from harmonylite.snapshot.leader import LeaderElection
from harmonylite.snapshot.scheduler import Scheduler
from harmonylite.storage import ObjectStore, open_store

HEAD_FRESH_SECONDS = 5.0  # a stream head read longer ago than this is unknown
# A node more than ``max_behind`` messages behind a stream is stale only when it has not been
# within them for this long: under heavy writes the messages in hand (received, not yet
# applied) pass any small count for a moment, while a node that really falls behind stays out.
BEHIND_GRACE_SECONDS = 3.0


def max_behind(max_entries: int) -> int:
    """Messages a snapshot may trail a stream's head by: a small part of what streams keep."""
    return near_head(max_entries)


@dataclass(frozen=True)
class NodeState:
    """What the service reads of the node, as it is at each call."""

    gaps: Callable[[], Mapping[str, object]]  # streams with messages this node misses
    consumers: Callable[[], Sequence[ShardConsumer]]
    activity: Callable[[], tuple[int, int]]  # (changes published, changes applied)
    unpublished_since: Callable[[], float | None]  # oldest local change not yet published


class SnapshotService:
    def __init__(self, cfg: Config, nc: Client, js: JetStreamContext, link: LinkState,
                 metrics: Metrics, state: NodeState, sleep: Callable[[], None]) -> None:
        self.cfg, self.js, self.metrics, self.state = cfg, js, metrics, state
        self.election = LeaderElection(
            js, cfg.node_id, cfg.snapshot.leader_ttl, bucket=namespace(cfg).lease_bucket,
            nc=nc,
            is_connected=lambda: nc.is_connected,
            on_change=self._leader_changed, replicas=cfg.replication_log.replicas,
            update_existing=cfg.replication_log.update_existing, eligible=self.stale_reason)
        self.max_behind = max_behind(cfg.replication_log.max_entries)
        self.scheduler = Scheduler(cfg, self.election, self._open_store, js=js,
                                   metrics=metrics, activity=state.activity,
                                   on_sleep=sleep, heads=self.heads)
        # Health and snapshot_staleness_seconds: since when the newest snapshot lacks a change.
        self.freshness = Freshness(js, newest=lambda: self.scheduler.newest,
                                   heads=self.heads, local_since=state.unpublished_since)
        metrics.track_snapshot_freshness(self.freshness.state)
        link.on_reconnect.append(self._reconnected)
        self.archive: ArchiveWriter | None = None
        if cfg.snapshot.archive:
            self.archive = ArchiveWriter(
                js=js, open_store=self._open_store, lease=Lease(self.election),
                streams=namespace(cfg).subjects(), node_id=cfg.node_id,
                interval_ms=cfg.snapshot.archive_interval,
                spool=Path(cfg.snapshot.temp_dir) if cfg.snapshot.temp_dir else None,
                metrics=metrics)

    def stale_reason(self) -> str | None:
        """Why a snapshot of this node's database now would be stale (None: it would not)."""
        if not self.cfg.replicate:
            return None  # it applies nothing from the streams: nothing to be behind
        gaps = self.state.gaps()
        if gaps:
            return f"this node misses messages of {', '.join(sorted(gaps))}"
        consumers = self.state.consumers()
        if not consumers:
            return "the consumers are not running yet"
        now = time.monotonic()
        for c in consumers:
            if c.stream_offline:
                continue  # offline for every node alike (its servers are down): no one is ahead
            if c.not_consuming is not None:
                return f"{c.stream} is not being consumed"
            if c.stalled is not None:
                return f"apply is stalled on {c.stream}"
            if c.head_seen_at is None or now - c.head_seen_at > HEAD_FRESH_SECONDS:
                return f"the head of {c.stream} cannot be read"
            if c.lag > self.max_behind and (
                    c.near_head_at is None or now - c.near_head_at > BEHIND_GRACE_SECONDS):
                return f"this node is {c.lag} messages behind {c.stream}"
        return None

    def heads(self) -> dict[str, int]:
        """Each stream's last sequence as this node last read it."""
        return {c.stream: c.stream_last_seq for c in self.state.consumers()}

    def _leader_changed(self, is_leader: bool) -> None:
        self.metrics.leader_changed(is_leader)
        self.scheduler.leadership_changed(is_leader)

    async def _reconnected(self) -> None:
        self.election.wake()

    async def _open_store(self) -> ObjectStore:
        return await open_store(self.cfg.snapshot, js=self.js,
                                bucket=namespace(self.cfg).snapshot_bucket)

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [asyncio.create_task(self.election.run(stop)),
                 asyncio.create_task(self.scheduler.run(stop)),
                 asyncio.create_task(self.freshness.run(stop))]
        if self.archive is not None:
            tasks.append(asyncio.create_task(self.archive.run(stop)))
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        if self.archive is not None:
            await self.archive.close()
        await self.scheduler.close()
        await self.election.release()
