"""A running node: change capture, NATS, publisher, one consumer per shard, and shutdown.

Every task belongs to the node and is awaited on the way out: on SIGINT/SIGTERM the publisher and
the consumers finish the batch in hand, pending changes get one last chance to go out, the
consumers unsubscribe, the connection closes, and the embedded server (if any) stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client
from nats.js import JetStreamContext

from harmonylite import __version__
from harmonylite.aio import wait_any
from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.install import InstallReport, install
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import HarmonyliteError
from harmonylite.node.embedded_nats import EmbeddedNats
from harmonylite.ops.health import HttpServer, probe_database, start_health_server
from harmonylite.ops.metrics import Metrics, start_metrics_server
from harmonylite.replication.apply import Applier, ApplyResult
from harmonylite.replication.consumer import ShardConsumer
from harmonylite.replication.nats_link import LinkState, connect, ensure_streams
from harmonylite.replication.publisher import ChangeWatcher, Publisher
from harmonylite.replication.seqmap import read_seq_map, write_seq_map

if TYPE_CHECKING:
    from harmonylite.snapshot.service import SnapshotService

log = logging.getLogger(__name__)

DEFAULT_POLL = 0.005


def _epoch(conn: sqlite3.Connection) -> str:
    """A random token per database copy, part of every message id (survives restarts)."""
    row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'epoch'").fetchone()
    if row:
        return str(row[0])
    token = secrets.token_hex(4)
    conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES ('epoch', ?)", (token,))
    return token


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
        self.nc: Client | None = None
        self.js: JetStreamContext | None = None
        self.publisher: Publisher | None = None
        self.watcher: ChangeWatcher | None = None
        self.consumers: list[ShardConsumer] = []
        self.install_report: InstallReport | None = None
        self.positions: dict[str, int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self.replicated_total = 0
        self.snapshots: SnapshotService | None = None
        self.applier: Applier | None = None
        self.metrics = Metrics.from_config(cfg.prometheus, node_id=cfg.node_id)
        self.metrics.track_nats_connected(lambda: self.nc is not None and self.nc.is_connected)
        self._servers: list[HttpServer] = []

    # --- start -----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.cfg
        await self._start_servers()
        await self._connect()
        assert self.js is not None
        if cfg.replicate and cfg.snapshot.enabled:
            # Restore from a snapshot when this node is new, lost its data or fell behind what
            # the streams still hold (and publish its pending changes first).
            from harmonylite.node.recovery import recover

            await recover(self)
        if not self.db_path.exists():
            raise HarmonyliteError(f"database file {self.db_path} does not exist")
        self.install_report = await self.writer.call(install)
        epoch = await self.writer.call(_epoch)
        log.info("change capture installed", extra={"tables": len(self.install_report.tables)})
        self.positions = await self._load_positions()
        if cfg.replicate:
            applier = self.applier = Applier()
            for shard in range(1, cfg.replication_log.shards + 1):
                stream = cfg.stream_name(shard)
                consumer = ShardConsumer(self.js, stream, cfg.subject(shard), self.writer, applier,
                                         self.positions.get(stream, 0), self._applied)
                await consumer.subscribe_with_retry()
                self.consumers.append(consumer)
                self._tasks.append(asyncio.create_task(consumer.run(self.stop_event)))
        if cfg.publish:
            self.publisher = Publisher(cfg, self.pub_db, self.js, epoch, metrics=self.metrics)
            publisher = self.publisher
            loop = asyncio.get_running_loop()
            interval = cfg.polling_interval / 1000 if cfg.polling_interval else DEFAULT_POLL

            def wake() -> None:
                loop.call_soon_threadsafe(publisher.wake.set)

            self.watcher = ChangeWatcher(str(self.db_path), interval, wake)
            self.watcher.start()
            self._tasks.append(asyncio.create_task(publisher.run(self.stop_event)))
            if cfg.snapshot.enabled:
                from harmonylite.snapshot.service import SnapshotService

                self.snapshots = SnapshotService(self)
                self._tasks.append(asyncio.create_task(self.snapshots.run(self.stop_event)))
        self._tasks.append(asyncio.create_task(self._housekeeping()))
        if cfg.sleep_timeout > 0 and self.snapshots is None:
            # (With snapshots, the service handles it: the leader takes a final snapshot first.)
            self._tasks.append(asyncio.create_task(self._sleep_when_idle()))
        log.info("node started", extra={"version": __version__, "publish": cfg.publish,
                                        "replicate": cfg.replicate,
                                        "shards": cfg.replication_log.shards})

    async def _start_servers(self) -> None:
        cfg = self.cfg
        if cfg.health_check.enable:
            self._servers.append(await start_health_server(
                cfg.health_check, self.health_status, snapshot_interval_ms=cfg.snapshot.interval,
                snapshot_enabled=cfg.snapshot.enabled))
        if cfg.prometheus.enable:
            self._servers.append(await start_metrics_server(cfg.prometheus, self.metrics))

    async def _connect(self) -> None:
        cfg = self.cfg
        urls = list(cfg.nats.urls)
        if not urls:
            self.embedded = EmbeddedNats(node_id=cfg.node_id, db_path=self.db_path,
                                         nats=cfg.nats, cluster=cfg.cluster)
            urls = [await self.embedded.start()]
            self._tasks.append(asyncio.create_task(self.embedded.supervise(self.stop_event)))
        self.link.on_reconnect.append(self._resubscribe)
        self.nc = await connect(cfg.nats, urls, f"harmonylite-{cfg.node_id}", self.link)
        self.js = self.nc.jetstream(publish_async_max_pending=1024)
        await ensure_streams(self.js, cfg)

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
        try:
            write_seq_map(self.seq_map_path, self.positions)
        except OSError as exc:
            log.error("cannot write %s: %s", self.seq_map_path, exc)

    async def _resubscribe(self) -> None:
        for consumer in self.consumers:
            try:
                await consumer.subscribe()
            except Exception as exc:
                log.warning("cannot resubscribe to %s: %s", consumer.stream, exc)

    def activity(self) -> tuple[int, int]:
        return (self.publisher.published_total if self.publisher else 0, self.replicated_total)

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

    async def _housekeeping(self) -> None:
        """Every cleanup_interval: prune published changes (publishers) and apply parked changes
        whose table appeared meanwhile (replicators), even when no new message would notice."""
        while not self.stop_event.is_set():
            await wait_any(self.stop_event, timeout=self.cfg.cleanup_interval / 1000)
            try:
                if self.publisher is not None:
                    pruned = await self.writer.call(changelog.prune)
                    if pruned:
                        log.debug("pruned %d published changes", pruned)
                if self.applier is not None:
                    await self.writer.call(self.applier.retry_parked)
            except sqlite3.Error as exc:
                log.warning("housekeeping of the change log failed: %s", exc)

    # --- state -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        last_applied = max((c.last_applied_at or 0 for c in self.consumers), default=0)
        return {
            "node_id": self.cfg.node_id,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "nats_connected": bool(self.nc is not None and self.nc.is_connected),
            "cdc_installed": self.install_report is not None,
            "tables_tracked": len(self.install_report.tables) if self.install_report else 0,
            "last_replicated_event_timestamp": last_applied or None,
            "last_published_event_timestamp": (self.publisher.last_published_at
                                               if self.publisher else None),
            "published_total": self.publisher.published_total if self.publisher else 0,
            "replicated_total": self.replicated_total,
            "positions": dict(self.positions),
        }

    async def health_status(self) -> dict[str, Any]:
        return {**self.status(), "version": __version__,
                "db_connected": await probe_database(self.db_path),
                "snapshot": self.metrics.snapshot_state()}

    # --- stop ------------------------------------------------------------------------------
    async def close(self) -> None:
        self.stop_event.set()
        for server in self._servers:
            await server.close()
        if self._tasks:
            for res in await asyncio.gather(*self._tasks, return_exceptions=True):
                if isinstance(res, BaseException) and not isinstance(res, asyncio.CancelledError):
                    log.error("task failed: %s", res, exc_info=res)
        if self.snapshots is not None:
            await self.snapshots.close()
        if self.publisher is not None and self.nc is not None and self.nc.is_connected:
            try:
                await asyncio.wait_for(self.publisher.flush(), 3.0)
            except Exception as exc:
                log.warning("changes left pending at shutdown (published on next start): %s", exc)
        if self.watcher is not None:
            self.watcher.stop()
        for consumer in self.consumers:
            await consumer.unsubscribe()
        if self.nc is not None:
            self.link.closing = True
            try:
                await asyncio.wait_for(self.nc.close(), 5.0)
            except Exception as exc:  # the server may already be gone; nothing is lost here
                log.debug("closing the NATS connection: %s", exc)
        if self.embedded is not None:
            await self.embedded.stop()
        if self.positions:
            with contextlib.suppress(OSError):
                write_seq_map(self.seq_map_path, self.positions, durable=True)
        self.writer.close()
        self.pub_db.close()


async def run_node(cfg: Config) -> int:
    node = Node(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, node.stop_event.set)
    try:
        await node.start()
        await node.stop_event.wait()
        log.info("shutting down")
    finally:
        await node.close()
    log.info("stopped")
    return 0
