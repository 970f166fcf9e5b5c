"""A running node: change capture, NATS, publisher, one consumer per shard, and shutdown.

Every task belongs to the node's supervisor (restarted with backoff if it raises, reported in
health if it keeps failing) and is awaited on the way out: on SIGINT/SIGTERM the publisher and
the consumers finish the batch in hand, pending changes get one last chance to go out, the
consumers unsubscribe, the connection closes, and the embedded server (if any) stops.

A node whose NATS does not answer within ``nats.connect_retries`` more attempts starts without
it: change capture is installed (the application's writes stay pending in the change log), the
connection is retried in the background forever, health says why, and the rest of the start
(streams, recovery, consumers, publisher, snapshots) runs once NATS answers. A node without a
database waits for NATS before creating one (it may be provisioned from a snapshot).

A gap found while running (a stream dropped messages this node had not applied) is recorded in
the database; with snapshots on, the node then starts over in the same process, and the start-up
recovery restores the newest snapshot that covers it. Without snapshots the gap stays in health
(503) and the log until an operator restores the node.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from harmonylite import __version__
from harmonylite.aio import wait_any
from harmonylite.bus.connection import Connection, LinkState
from harmonylite.bus.names import namespace
from harmonylite.bus.streams import ensure_streams, stream_heads
from harmonylite.cdc import changelog, origin, schema_changes, takeover
from harmonylite.cdc.install import InstallReport, install
from harmonylite.cluster.heartbeat import Buckets, HeartbeatPublisher
from harmonylite.cluster.read import ClusterReader
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import HarmonyliteError
from harmonylite.node import status
from harmonylite.node.claim import NodeClaim
from harmonylite.node.embedded_nats import EmbeddedNats
from harmonylite.node.heartbeat_state import Lease, collector
from harmonylite.node.housekeeping import housekeeping
from harmonylite.node.schema_follow import SchemaFollower
from harmonylite.node.settings_change import Cut
from harmonylite.node.shared_settings import (
    Record,
    SettingsMismatch,
    SettingsWatch,
    check_at_start,
)
from harmonylite.node.snapshot_service import NodeState, SnapshotService
from harmonylite.node.supervisor import Supervisor
from harmonylite.node.without_nats import start_when_reachable, start_without_nats
from harmonylite.ops.health import probe_database, start_health_server
from harmonylite.ops.http_server import HttpServer
from harmonylite.ops.metrics import Metrics, start_metrics_server
from harmonylite.replication import conflicts, deadletter, positions
from harmonylite.replication.apply import Applier
from harmonylite.replication.consumer import ShardConsumer, near_head
from harmonylite.replication.cut_hold import Hold
from harmonylite.replication.outcome import ApplyResult
from harmonylite.replication.publisher import ChangeWatcher, Publisher
from harmonylite.replication.read_ahead import ReadAhead, stop_all
from harmonylite.replication.schema_send import SchemaSender
from harmonylite.replication.seqmap import read_seq_map, write_seq_map
from harmonylite.restore import join
from harmonylite.restore.at_start import StartParts, recover
from harmonylite.restore.coverage import gaps

log = logging.getLogger(__name__)

DEFAULT_POLL = 0.005
# Parked changes are applied once the schema has been still this long (docs/frameworks.md).
UNPARK_SETTLE_SECONDS = 2.0
SEQ_MAP_EVERY = 0.25  # seconds between rewrites of the seq-map file while applying


class Node:
    def __init__(self, cfg: Config) -> None:
        if not cfg.db_path:
            raise HarmonyliteError("db_path is not set: name the SQLite database in the config")
        self.cfg = cfg
        self.db_path = Path(cfg.db_path)
        self.seq_map_path = Path(cfg.seq_map_path)
        self.started_at = time.time()
        self.stop_event = asyncio.Event()
        self.writer = DbThread(self.db_path, "writer")
        self.pub_db = DbThread(self.db_path, "publisher")
        self.embedded: EmbeddedNats | None = None
        self.link = LinkState()
        self.connection: Connection | None = None
        self.nc: Client | None = None  # connecting, or connected (see self.connection)
        self._deferred: asyncio.Task[None] | None = None  # the start waiting for NATS
        self.failure: BaseException | None = None  # a start in the background that failed
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None
        self.watcher: ChangeWatcher | None = None
        self.consumers: list[ShardConsumer] = []
        self.install_report: InstallReport | None = None
        self.positions: dict[str, int] = {}
        self._seq_map_written = 0.0  # monotonic time of the last write of the seq-map file
        self._positions_due: asyncio.Task[None] | None = None  # see _write_positions_soon
        self.supervisor = Supervisor(self.stop_event)
        self.gaps: dict[str, tuple[int, int]] = {}  # found and not covered by a restore
        self.dead_letters = 0
        self._conflicts_at_start = 0
        self.restart_reason: str | None = None  # set to start the node over in this process
        self.restored: str | None = None  # the snapshot this start restored, if any
        # Streams read since recovery began, handed to the consumers when they subscribe.
        self.read_ahead: dict[str, ReadAhead] = {}
        # Why the start is waiting (NATS, a snapshot): health 503 meanwhile.
        self.waiting: str | None = None
        # This start's epoch: its changes go out under an origin no copy of the database
        # shares (see ``origin``).
        self.epoch = origin.new_epoch()
        self.claim: NodeClaim | None = None
        self.joining: join.Joining | None = None  # a database with rows of its own (node/join.py)
        self._background: set[asyncio.Task[None]] = set()
        self.replicated_total = 0
        self.snapshots: SnapshotService | None = None
        self.applier: Applier | None = None
        self.schema: SchemaFollower | None = None
        self.shared: Record | None = None  # the cluster's shared settings, as read at start
        self.settings_watch: SettingsWatch | None = None
        self.retired: dict[str, str] = {}  # retired streams still there, read too: -> subject
        self.cut: Cut | None = None  # the last shard-count change's cut, held at until passed
        self._consumed: set[str] = set()
        self.metrics = Metrics.from_config(cfg.prometheus, node_id=cfg.node_id)
        self.metrics.track_nats_connected(lambda: self.nc is not None and self.nc.is_connected)
        self.metrics.parked_changes.set_function(
            lambda: self.schema.status()["parked_changes"] if self.schema is not None else 0)
        self.metrics.conflicts.set_function(self.conflicts)
        self.metrics.apply_stalled.set_function(
            lambda: sum(c.stalled is not None for c in self.consumers))
        self._servers: list[HttpServer] = []

    # --- start -----------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the node; without NATS after ``nats.connect_retries`` more attempts, start what
        needs no NATS (change capture) and the rest once it is reachable (in the background)."""
        cfg = self.cfg
        await self._start_servers()
        conn = await self._open_nats()
        if await conn.wait(self.stop_event, attempts=cfg.nats.connect_retries + 1):
            await self.start_connected()
        elif not self.stop_event.is_set():
            self.install_report = await start_without_nats(
                cfg, self.db_path, self.seq_map_path, self.writer, conn)
            if self.install_report is None:
                self.waiting = "the database is created once NATS is reachable"
            self._deferred = asyncio.get_running_loop().create_task(start_when_reachable(
                conn, self.stop_event, self.start_connected, self._set_waiting,
                self._failed))

    async def start_connected(self) -> None:
        """Everything that needs NATS: the streams, the start-up recovery, the consumers, the
        publisher and the snapshot service."""
        cfg = self.cfg
        assert self.nc is not None
        self.js = self.nc.jetstream(publish_async_max_pending=1024)
        # Before any stream is made: a node whose shard count, compression or prefixes differ
        # from its cluster's would split it (exit 2, naming the key and both values).
        try:
            self.shared = await check_at_start(self.js, cfg)
        except SettingsMismatch as exc:
            log.error("%s", exc, extra={"keys": [d.key for d in exc.differences]})
            raise
        await ensure_streams(self.js, cfg)
        self.retired = await self._existing(self.shared.retired)
        self.settings_watch = SettingsWatch(self.js, cfg)
        self._spawn("shared settings", self.settings_watch.run)
        # One live node per node_id: refused here, before anything is published or applied.
        self.claim = NodeClaim(self.js, namespace(cfg).lease_bucket, cfg.node_id, self.db_path,
                               ttl_ms=cfg.snapshot.leader_ttl,
                               replicas=cfg.replication_log.replicas)
        await self.claim.start()
        self._spawn("node_id claim", self.claim.run)
        if cfg.replicate and cfg.snapshot.enabled:
            # Before anything writes to it: rows of its own are never replaced by the cluster's
            # snapshot unless the operator chose how (snapshot.join; docs/recovery.md).
            self.joining = await join.check(cfg, self.js, self.db_path, self.seq_map_path)
        if self.db_path.exists():
            # A database HarmonyLite ran on: its layout goes, its pending changes are kept (and
            # its positions read) before anything could restore over it.
            await self.writer.call_waiting(lambda c: takeover.take_over(c, self.seq_map_path),
                                           "start", self.stop_event)
        if cfg.replicate and cfg.snapshot.enabled:
            # Restore from a snapshot when this node is new, lost its data or fell behind what
            # the streams still hold (and publish its pending changes first).
            recovery = await recover(StartParts(
                cfg, self.nc, self.js, self.db_path, self.seq_map_path, self.stop_event,
                self.metrics, self._set_waiting, self.joining))
            self.restored, self.read_ahead = recovery.restored, recovery.readers
            self.joining = recovery.joining
        if not self.db_path.exists():
            raise HarmonyliteError(f"database file {self.db_path} does not exist")
        self.install_report = await self.writer.call_waiting(
            lambda conn: install(conn, cfg.replicates_table), "install change capture",
            self.stop_event)
        if cfg.replicate_ddl:
            # A schema change made while the node was stopped is this node's to send.
            await self.writer.call_waiting(
                lambda conn: schema_changes.capture_now(conn, cfg.node_id, cfg.replicates_table),
                "start", self.stop_event)
        # HarmonyLite's pending changes, through our capture.
        await self.writer.call_waiting(takeover.replay_pending, "start", self.stop_event)
        # A merge's rows, through our capture.
        await join.finish(self.joining, cfg, self.db_path, self.writer, self.restored)
        epoch = self.epoch
        own_origins = await self.writer.call_waiting(
            lambda c: origin.adopt(c, cfg.node_id, epoch, self.db_path), "start",
            self.stop_event)
        log.info("change capture installed", extra={"tables": len(self.install_report.tables)})
        self.positions = await self._load_positions()
        self.dead_letters = await self.writer.call(deadletter.count)
        self._conflicts_at_start = await self.writer.call(conflicts.count)
        if cfg.replicate:
            await self._check_gaps_at_start()
            applier = self.applier = Applier(skip_pending=cfg.publish,
                                                   origin=f"{cfg.node_id}:{epoch}",
                                                   own_origins=own_origins,
                                                   replicated=cfg.replicates_table,
                                                   unpark_settle=UNPARK_SETTLE_SECONDS,
                                                   replicate_ddl=cfg.replicate_ddl)
            # Past the last shard-count change's cut, each stream waits until every old stream
            # is applied up to it: a row's old changes first, on every node alike.
            self.cut = Cut(self.shared.cut, self.positions, lambda: self.gaps)
            self._consumed = {*namespace(cfg).streams(), *self.retired}
            behind = self.cut.waiting_for(self._consumed)
            if behind:
                log.info("the shard count changed: applying %s before anything newer",
                         ", ".join(behind))
            for stream, subject in namespace(cfg).subjects().items():
                await self._consume(stream, subject, applier)
            for stream, subject in self.retired.items():
                # A shard count changed cluster-wide: nodes still on the old one may write here
                # until restarted, and this node may not have read all it holds.
                log.info("reading retired stream %s too (shard count changed)", stream)
                await self._consume(stream, subject, applier)
        self.schema = SchemaFollower(self.writer, self.applier, self.js, cfg.node_id,
                                     cfg.replication_log.replicas, cfg.replicates_table,
                                     bucket=namespace(cfg).schema_bucket,
                                     replicate_ddl=cfg.replicate_ddl)
        self._spawn("schema", self.schema.run)
        if cfg.publish:
            interval = cfg.polling_interval / 1000 if cfg.polling_interval else DEFAULT_POLL
            self.publisher = Publisher(
                cfg, self.pub_db, self.js, epoch, metrics=self.metrics, pace=interval,
                held=self.applier.held_tables if self.applier is not None else None,
                schema=SchemaSender(cfg, self.pub_db, self.js, epoch)
                if cfg.replicate_ddl else None,
                hold=lambda: self.settings_watch.hold if self.settings_watch else None)
            publisher = self.publisher
            loop = asyncio.get_running_loop()

            def wake() -> None:
                loop.call_soon_threadsafe(publisher.wake.set)

            self.watcher = ChangeWatcher(str(self.db_path), interval, wake,
                                         on_schema=self.schema.notify_threadsafe())
            self.watcher.start()
            self._spawn("publisher", publisher.run)
            # A node that applies nothing from the streams (replicate = false) holds none of the
            # cluster's state: it is no snapshot leader candidate (its snapshots would claim no
            # position, and none would ever cover a stream).
            if cfg.snapshot.enabled and cfg.replicate:
                state = NodeState(gaps=lambda: self.gaps, consumers=lambda: self.consumers,
                                  activity=self.activity,
                                  unpublished_since=self._unpublished_since)
                self.snapshots = SnapshotService(cfg, self.nc, self.js, self.link, self.metrics,
                                                 state, sleep=self.stop_event.set)
                self._spawn("snapshots", self.snapshots.run)
        self._start_heartbeats()
        chores = functools.partial(
            housekeeping, self.stop_event, self.writer, interval=cfg.cleanup_interval / 1000,
            publish=cfg.publish, applier=self.applier, schema=self.schema)
        self.supervisor.spawn("housekeeping", chores)
        if cfg.sleep_timeout > 0 and self.snapshots is None:
            # (With snapshots, the service handles it: the leader takes a final snapshot first.)
            self.supervisor.spawn("sleep timer", self._sleep_when_idle)
        log.info("node started", extra={"version": __version__, "publish": cfg.publish,
                                        "replicate": cfg.replicate,
                                        "shards": cfg.replication_log.shards})

    def _start_heartbeats(self) -> None:
        """This node's state in the cluster's heartbeat bucket every second (cluster status,
        the live page)."""
        cfg = self.cfg
        buckets = Buckets(namespace(cfg).heartbeat_bucket, namespace(cfg).last_seen_bucket,
                          replicas=cfg.replication_log.replicas,
                          update_existing=cfg.replication_log.update_existing)
        publisher = HeartbeatPublisher(
            self.js, cfg.node_id, buckets, collector(cfg, self.health_status, self.lease),
            lambda: self.nc is not None and self.nc.is_connected)
        self._spawn("heartbeats", publisher.run)

    def lease(self) -> Lease | None:
        """The snapshot lease as this node sees it (None: it takes no part in snapshots)."""
        if self.snapshots is None:
            return None
        e = self.snapshots.election
        return Lease(e.holder if e.is_leader or e.holder != self.cfg.node_id else None, e.term,
                     e.is_leader)

    async def _consume(self, stream: str, subject: str, applier: Applier) -> None:
        assert self.js is not None
        consumer = ShardConsumer(self.js, stream, subject, self.writer, applier,
                                 self.positions.get(stream, 0), self._applied,
                                 on_gap=self._gap_found,
                                 near_head=near_head(self.cfg.replication_log.max_entries),
                                 hold=self._hold(stream))
        reader = self.read_ahead.pop(stream, None)
        if reader is not None:
            # Subscribe after the last message read ahead, then stop reading ahead: nothing
            # falls between the two however fast the stream rolls over.
            consumer.preload(reader.take_after(consumer.position))
        await consumer.subscribe_with_retry()
        if reader is not None:
            await reader.stop()
        self.consumers.append(consumer)
        self._spawn(f"consumer {stream}", consumer.run)
        # Re-creates the subscription whenever it is lost (server gone, leader change).
        self._spawn(f"subscription {stream}", consumer.keep)

    def _hold(self, stream: str) -> Hold | None:
        cut, consumed = self.cut, self._consumed
        if cut is None or not cut.waiting_for(consumed):
            return None
        return Hold(cut.after(stream), lambda: cut.waiting_for(consumed))

    async def _start_servers(self) -> None:
        cfg = self.cfg
        if cfg.health_check.enable:
            # The live page reads the heartbeats of every node, this one's included.
            names = namespace(cfg)
            reader = ClusterReader(lambda: self.js, names.heartbeat_bucket,
                                   names.last_seen_bucket)
            self._servers.append(await start_health_server(
                cfg.health_check, self.health_status, snapshot_interval_ms=cfg.snapshot.interval,
                snapshot_enabled=cfg.snapshot.enabled, cluster=reader.document))
        if cfg.prometheus.enable:
            self._servers.append(await start_metrics_server(cfg.prometheus, self.metrics))

    async def _open_nats(self) -> Connection:
        """Start the embedded server (without ``nats.urls``) and begin connecting."""
        cfg = self.cfg
        urls = list(cfg.nats.urls)
        if not urls:
            self.embedded = EmbeddedNats(node_id=cfg.node_id, db_path=self.db_path,
                                         nats=cfg.nats, cluster=cfg.cluster)
            urls = [await self.embedded.start(stop=self.stop_event)]
            self._spawn("embedded nats-server", self.embedded.supervise)
        self.link.on_reconnect.append(self._resubscribe)
        self.connection = Connection(cfg.nats, urls, f"harmonylite-{cfg.node_id}", self.link)
        self.nc = self.connection.nc
        self.connection.start()
        return self.connection

    def _set_waiting(self, why: str | None) -> None:
        self.waiting = why

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc

    async def _existing(self, streams: dict[str, str]) -> dict[str, str]:
        assert self.js is not None
        there = await stream_heads(self.js, list(streams))
        return {s: subject for s, subject in streams.items() if s in there}

    def _spawn(self, name: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        stop = self.stop_event
        self.supervisor.spawn(name, lambda: run(stop))

    async def _check_gaps_at_start(self) -> None:
        """Streams that no longer hold what follows this node's positions, and gaps found
        earlier, are recorded and reported; nothing runs on silently (DESIGN rule 16)."""
        assert self.js is not None
        heads = await stream_heads(self.js, [*namespace(self.cfg).streams(), *self.retired])
        # What a stream dropped but its read-ahead still holds is no gap.
        heads = {s: min(first, self.read_ahead[s].first) if s in self.read_ahead else first
                 for s, first in heads.items()}
        found = gaps(self.positions, heads)

        def record(conn: sqlite3.Connection) -> None:
            for g in found:
                changelog.record_gap(conn, g.stream, g.first, g.last)

        await self.writer.call(record)
        self.gaps = await self.writer.call(changelog.recorded_gaps)
        if found and self.restored is not None and self.cfg.snapshot.enabled \
                and self.restart_reason is None:
            # The streams dropped what follows the snapshot just restored between recovery's
            # last look and now (heavy writes, short retention): start over to restore a newer
            # one rather than run diverged. Each round restores, so each makes progress.
            self.restart_reason = "the streams moved past snapshot " + self.restored + " (" + \
                ", ".join(map(str, found)) + ")"
            self.stop_event.set()
        for stream, (first, last) in sorted(self.gaps.items()):
            log.error("this node never applied messages %d..%d of stream %s (the stream dropped "
                      "them): it may differ from the other nodes until it is restored from a "
                      "snapshot that covers them", first, last, stream,
                      extra={"stream": stream, "from_seq": first, "to_seq": last})

    def _gap_found(self, stream: str, first: int, last: int) -> None:
        """A consumer met a jump in sequences: record it, then recover or report it."""
        self.metrics.gap_found()
        prev = self.gaps.get(stream)
        self.gaps[stream] = (prev[0] if prev else first, last)
        task = asyncio.get_running_loop().create_task(
            self.writer.call(lambda c: changelog.record_gap(c, stream, first, last)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # A gap already known at start was the start-up recovery's to cover: starting over
        # again would not cover it better.
        known_at_start = prev is not None and first <= prev[1] + 1
        if self.cfg.snapshot.enabled and self.restart_reason is None and not known_at_start:
            self.restart_reason = f"gap in {stream} ({first}..{last})"
            log.warning("starting the node over to restore a snapshot that covers the gap in "
                        "%s", stream, extra={"stream": stream})
            self.stop_event.set()

    async def _load_positions(self) -> dict[str, int]:
        in_db = await self.pub_db.call(changelog.applied_sequences)
        from_file = await asyncio.to_thread(read_seq_map, self.seq_map_path) or {}
        # The database copy is written with the data; the file can only lag behind it.
        positions = {**from_file, **in_db}
        await asyncio.to_thread(write_seq_map, self.seq_map_path, positions)
        return positions

    def _applied(self, stream: str, position: int, result: ApplyResult) -> None:
        self.positions[stream] = position
        # Changes skipped because this node already holds a newer local version count too:
        # the stream's state is in the database either way.
        done = result.rows + result.skipped_pending
        self.replicated_total += done
        self.metrics.replicated(done, published_at=result.published_at)
        if result.failed:
            self.metrics.apply_failed(len(result.failed))
        if result.dead_letters:
            self.dead_letters += result.dead_letters
            self.metrics.dead_lettered(result.dead_letters)
        for c in self.consumers:
            if c.stream == stream:
                self.metrics.stream_state(stream, c.position, c.lag)
        if self.snapshots is not None:
            self.snapshots.scheduler.poke()
        if self.applier is not None and self.applier.deferred and self._positions_due is None:
            # A group that wrote nothing else left its position in memory (see
            # replication.positions): written once it is MAX_AGE old, also when nothing follows,
            # so a snapshot taken a moment later (by this node or by the CLI) holds it.
            self._positions_due = asyncio.get_running_loop().create_task(
                self._write_positions_soon())
        # The file mirrors the positions the database holds (and can only lag behind them):
        # rewritten at most every SEQ_MAP_EVERY seconds, not per applied group, whose file
        # create and rename cost the node more than applying a small group; written again, and
        # durably, at shutdown.
        now = time.monotonic()
        if now - self._seq_map_written < SEQ_MAP_EVERY:
            return
        self._seq_map_written = now
        try:
            write_seq_map(self.seq_map_path, self.positions)
        except OSError as exc:
            log.error("cannot write %s: %s", self.seq_map_path, exc)

    async def _write_positions_soon(self) -> None:
        try:
            await asyncio.sleep(positions.MAX_AGE)
            if self.applier is not None:
                await self.writer.call(self.applier.flush_positions)
        except sqlite3.Error as exc:
            log.warning("stream positions not recorded yet (retried with the next group, by "
                        "housekeeping and at stop): %s", exc)
        finally:
            self._positions_due = None

    async def _resubscribe(self) -> None:
        # Each consumer's keeper re-creates its subscription, retrying until it works: a cluster
        # that just lost the server we were on may need seconds to elect the streams' leaders.
        for consumer in self.consumers:
            consumer.resubscribe()

    def activity(self) -> tuple[int, int]:
        return (self.publisher.published_total if self.publisher else 0, self.replicated_total)

    def _unpublished_since(self) -> float | None:
        return self.publisher.unpublished_since if self.publisher is not None else None

    async def _sleep_when_idle(self) -> None:
        """sleep_timeout: stop the node after that long without publishing or applying."""
        timeout = self.cfg.sleep_timeout / 1000
        seen, since = self.activity(), time.monotonic()
        while not self.stop_event.is_set():
            await wait_any(self.stop_event, timeout=min(1.0, timeout))
            now = self.activity()
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since >= timeout:
                log.info("no activity for %.1f s (sleep_timeout): stopping", timeout)
                self.stop_event.set()

    # --- state -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        last_applied = max((c.last_applied_at or 0 for c in self.consumers), default=0)
        return {
            "node_id": self.cfg.node_id,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "nats_error": None if self.nc is not None and self.nc.is_connected
            else self.link.reason(),
            "cdc_installed": self.install_report is not None,
            "tables_tracked": len(self.install_report.tables) if self.install_report else 0,
            "last_replicated_event_timestamp": last_applied or None,
            "last_published_event_timestamp": (self.publisher.last_published_at
                                               if self.publisher else None),
            "published_total": self.publisher.published_total if self.publisher else 0,
            "replicated_total": self.replicated_total,
            "positions": dict(self.positions),
            "replication": self.replication_state(),
            "dead_letters": self.dead_letters,
            "conflicts": self.conflicts(),
            "warnings": self.warnings(),
            "schema": self.schema.status() if self.schema is not None else {},
            "problems": self.problems(),
            **({"archive": self.snapshots.archive.status()}
               if self.snapshots is not None and self.snapshots.archive is not None else {}),
        }

    def replication_state(self) -> dict[str, Any]:
        return status.replication(self.consumers, self.gaps)

    def conflicts(self) -> int:
        """Rows displaced or overwritten by conflicts and recorded (see docs/conflicts.md)."""
        return self._conflicts_at_start + (self.applier.displaced if self.applier else 0)

    def warnings(self) -> list[str]:
        out = status.warnings(self.dead_letters, self.conflicts())
        archive = self.snapshots.archive if self.snapshots is not None else None
        if archive is not None:
            out += [f"the archive of {s} misses messages {st.gap[0]}..{st.gap[1]}: the stream "
                    "dropped them before they were archived (harmonylite archive verify)"
                    for s, st in sorted(archive.state.items()) if st.gap]
        return out

    def problems(self) -> list[str]:
        out = status.problems(self.supervisor, self.consumers, self.gaps)
        if self.settings_watch is not None and self.settings_watch.problem is not None:
            out.append(self.settings_watch.problem)
        return ([self.waiting] if self.waiting else []) + out

    async def health_status(self) -> dict[str, Any]:
        return {**self.status(), "version": __version__,
                "db_connected": await probe_database(self.db_path),
                "snapshot": self.metrics.snapshot_state()}

    # --- stop ------------------------------------------------------------------------------
    async def close(self) -> None:
        self.stop_event.set()
        if self._deferred is not None:
            # A start waiting for NATS returns at once on the stop; one under way finishes (as a
            # start that found NATS at once would, before the node stops).
            await asyncio.gather(self._deferred, return_exceptions=True)
        for server in self._servers:
            await server.close()
        await self.supervisor.wait()
        if self.claim is not None:
            await self.claim.release()
        if self.snapshots is not None:
            await self.snapshots.close()
        if self.publisher is not None and self.nc is not None and self.nc.is_connected:
            try:
                await asyncio.wait_for(self.publisher.flush(), 3.0)
            except Exception as exc:
                log.warning("changes left pending at shutdown (published on next start): %s", exc)
        if self.watcher is not None:
            self.watcher.stop()
        await stop_all(self.read_ahead)
        for consumer in self.consumers:
            await consumer.unsubscribe()
        if self._positions_due is not None:
            self._positions_due.cancel()  # written just below
        if self.applier is not None:
            try:  # positions of groups that wrote nothing else (see replication.positions)
                await self.writer.call(self.applier.flush_positions)
            except sqlite3.Error as exc:
                log.warning("stream positions not recorded at shutdown (their messages are "
                            "applied again on the next start, which is harmless): %s", exc)
        if self.connection is not None:
            await self.connection.close()
        if self.embedded is not None:
            await self.embedded.stop()
        if self.positions:
            with contextlib.suppress(OSError):
                write_seq_map(self.seq_map_path, self.positions, durable=True)
        self.writer.close()
        self.pub_db.close()


async def run_node(cfg: Config) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    while True:
        node = Node(cfg)

        def on_signal(node: Node = node) -> None:
            stopping.set()
            node.stop_event.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await node.start()
            await node.stop_event.wait()
            log.info("shutting down")
        finally:
            await node.close()
        if node.claim is not None and node.claim.taken is not None:
            raise node.claim.taken  # another live node uses this node_id (exit 2)
        if node.failure is not None:
            raise node.failure
        if node.restart_reason is None or stopping.is_set():
            break
        log.info("starting over: %s", node.restart_reason)
    log.info("stopped")
    return 0
