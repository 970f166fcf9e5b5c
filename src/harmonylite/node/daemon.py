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

A gap found while running is recorded and reported (``node.progress``); with snapshots on, the
node then starts over in the same process (``node.run``) and restores a snapshot that covers it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from harmonylite import __version__
from harmonylite.bus.connection import Connection, LinkState
from harmonylite.bus.names import namespace
from harmonylite.bus.streams import ensure_streams, stream_heads
from harmonylite.cdc import origin
from harmonylite.cdc.install import InstallReport
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import HarmonyliteError
from harmonylite.node import status
from harmonylite.node.claim import NodeClaim
from harmonylite.node.consumers import Consumers
from harmonylite.node.embedded_nats import EmbeddedNats
from harmonylite.node.heartbeat_state import Lease
from harmonylite.node.housekeeping import housekeeping, sleep_when_idle
from harmonylite.node.prepare import prepare
from harmonylite.node.progress import Progress
from harmonylite.node.reporting import heartbeats, start_servers
from harmonylite.node.schema_follow import SchemaFollower
from harmonylite.node.shared_settings import (
    Record,
    SettingsMismatch,
    SettingsWatch,
    check_at_start,
)
from harmonylite.node.snapshot_service import NodeState, SnapshotService
from harmonylite.node.supervisor import Supervisor
from harmonylite.node.without_nats import start_when_reachable, start_without_nats
from harmonylite.ops.health import probe_database
from harmonylite.ops.http_server import HttpServer
from harmonylite.ops.metrics import Metrics
from harmonylite.replication.apply import Applier
from harmonylite.replication.consumer import ShardConsumer
from harmonylite.replication.publisher import ChangeWatcher, Publisher
from harmonylite.replication.read_ahead import ReadAhead, stop_all
from harmonylite.replication.schema_send import SchemaSender
from harmonylite.restore.at_start import StartParts

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
        self.install_report: InstallReport | None = None
        self.supervisor = Supervisor(self.stop_event)
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
        self.snapshots: SnapshotService | None = None
        self.applier: Applier | None = None
        self.schema: SchemaFollower | None = None
        self.shared: Record | None = None  # the cluster's shared settings, as read at start
        self.settings_watch: SettingsWatch | None = None
        self.retired: dict[str, str] = {}  # retired streams still there, read too: -> subject
        self.metrics = Metrics.from_config(cfg.prometheus, node_id=cfg.node_id)
        self.consumers: list[ShardConsumer] = []
        self.progress = Progress(
            cfg, self.writer, self.seq_map_path, self.metrics, self.consumers,
            lambda: self.applier,
            lambda: self.snapshots.scheduler.poke() if self.snapshots is not None else None,
            self._restart)
        self.streams = Consumers(cfg, self.writer, self.progress, self._spawn)
        self.consumers = self.streams.all
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
        self._servers = await start_servers(cfg, self.health_status, self.metrics,
                                            lambda: self.js)
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
        ready = await prepare(StartParts(
            cfg, self.nc, self.js, self.db_path, self.seq_map_path, self.stop_event,
            self.metrics, self._set_waiting), self.writer, self.epoch, self.read_ahead)
        self.install_report, self.restored = ready.install_report, ready.restored
        epoch = self.epoch
        await self.progress.load(self.pub_db)
        if cfg.replicate:
            await self.progress.check_gaps_at_start(
                self.js, [*namespace(cfg).streams(), *self.retired], self.read_ahead,
                self.restored)
            applier = self.applier = Applier(skip_pending=cfg.publish,
                                                   origin=f"{cfg.node_id}:{epoch}",
                                                   own_origins=ready.own_origins,
                                                   replicated=cfg.replicates_table,
                                                   unpark_settle=UNPARK_SETTLE_SECONDS,
                                                   replicate_ddl=cfg.replicate_ddl)
            await self.streams.start(self.js, applier, self.shared.cut, self.retired,
                                     self.read_ahead)
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
                hold=lambda: self.settings_watch.hold if self.settings_watch else None,
                # (With no applier its changes never come back: nothing to keep for them.)
                returns=self.applier.returns if self.applier is not None else None)
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
                state = NodeState(gaps=lambda: self.progress.gaps, consumers=lambda: self.consumers,
                                  activity=self.activity,
                                  unpublished_since=self._unpublished_since)
                self.snapshots = SnapshotService(cfg, self.nc, self.js, self.link, self.metrics,
                                                 state, sleep=self.stop_event.set)
                self._spawn("snapshots", self.snapshots.run)
        beats = heartbeats(cfg, self.js, self.health_status, self.lease,
                           lambda: self.nc is not None and self.nc.is_connected)
        self._spawn("heartbeats", beats.run)
        chores = functools.partial(
            housekeeping, self.stop_event, self.writer, interval=cfg.cleanup_interval / 1000,
            publish=cfg.publish, applier=self.applier, schema=self.schema,
            returns=self.applier.returns if self.applier is not None else None)
        self.supervisor.spawn("housekeeping", chores)
        if cfg.sleep_timeout > 0 and self.snapshots is None:
            # (With snapshots, the service handles it: the leader takes a final snapshot first.)
            self.supervisor.spawn("sleep timer", functools.partial(
                sleep_when_idle, self.stop_event, cfg.sleep_timeout / 1000, self.activity))
        log.info("node started", extra={"version": __version__, "publish": cfg.publish,
                                        "replicate": cfg.replicate,
                                        "shards": cfg.replication_log.shards})

    def lease(self) -> Lease | None:
        """The snapshot lease as this node sees it (None: it takes no part in snapshots)."""
        if self.snapshots is None:
            return None
        e = self.snapshots.election
        return Lease(e.holder if e.is_leader or e.holder != self.cfg.node_id else None, e.term,
                     e.is_leader)

    async def _open_nats(self) -> Connection:
        """Start the embedded server (without ``nats.urls``) and begin connecting."""
        cfg = self.cfg
        urls = list(cfg.nats.urls)
        if not urls:
            self.embedded = EmbeddedNats(node_id=cfg.node_id, db_path=self.db_path,
                                         nats=cfg.nats, cluster=cfg.cluster)
            urls = [await self.embedded.start(stop=self.stop_event)]
            self._spawn("embedded nats-server", self.embedded.supervise)
        self.link.on_reconnect.append(self.streams.resubscribe)
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

    def _restart(self, reason: str) -> bool:
        """Start the node over in this process (False: it already does, for another reason)."""
        if self.restart_reason is not None:
            return False
        self.restart_reason = reason
        self.stop_event.set()
        return True

    def _spawn(self, name: str, run: Callable[[asyncio.Event], Awaitable[None]]) -> None:
        stop = self.stop_event
        self.supervisor.spawn(name, lambda: run(stop))

    def activity(self) -> tuple[int, int]:
        published = self.publisher.published_total if self.publisher else 0
        return published, self.progress.replicated_total

    def _unpublished_since(self) -> float | None:
        return self.publisher.unpublished_since if self.publisher is not None else None

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
            "replicated_total": self.progress.replicated_total,
            "positions": dict(self.progress.positions),
            "replication": self.replication_state(),
            "dead_letters": self.progress.dead_letters,
            "conflicts": self.conflicts(),
            "warnings": self.warnings(),
            "schema": self.schema.status() if self.schema is not None else {},
            "problems": self.problems(),
            **({"archive": self.snapshots.archive.status()}
               if self.snapshots is not None and self.snapshots.archive is not None else {}),
        }

    def replication_state(self) -> dict[str, Any]:
        return status.replication(self.consumers, self.progress.gaps)

    def conflicts(self) -> int:
        """Rows displaced or overwritten by conflicts and recorded (see docs/conflicts.md)."""
        return self.progress.conflicts_at_start + (self.applier.displaced if self.applier else 0)

    def warnings(self) -> list[str]:
        out = status.warnings(self.progress.dead_letters, self.conflicts())
        archive = self.snapshots.archive if self.snapshots is not None else None
        if archive is not None:
            out += [f"the archive of {s} misses messages {st.gap[0]}..{st.gap[1]}: the stream "
                    "dropped them before they were archived (harmonylite archive verify)"
                    for s, st in sorted(archive.state.items()) if st.gap]
        return out

    def problems(self) -> list[str]:
        out = status.problems(self.supervisor, self.consumers, self.progress.gaps)
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
        await self.streams.unsubscribe()
        await self.progress.flush()
        if self.connection is not None:
            await self.connection.close()
        if self.embedded is not None:
            await self.embedded.stop()
        self.progress.write_file()
        self.writer.close()
        self.pub_db.close()
