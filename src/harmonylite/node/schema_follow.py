"""Following the application's schema while the node runs (no restart needed).

The change watcher notices ``PRAGMA schema_version`` moving (any connection's DDL). Then, on the
writer's thread and in one write transaction: capture is brought up to date (new tables and
rebuilt ones get their triggers and have their current rows published), and parked changes that
now fit the schema are applied. The node's view of its schema is then put in the cluster's schema
registry. Housekeeping calls :meth:`SchemaFollower.refresh` too, so parked counts stay current.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from typing import Any

from nats.js import JetStreamContext

from harmonylite.aio import wait_any
from harmonylite.cdc import schema_changes
from harmonylite.cdc.install import install
from harmonylite.db.connection import DbThread
from harmonylite.replication import schema_registry
from harmonylite.replication.apply import Applier
from harmonylite.replication.outcome import is_transient

log = logging.getLogger(__name__)


class SchemaFollower:
    def __init__(self, writer: DbThread, applier: Applier | None, js: JetStreamContext,
                 node_id: int, replicas: int, replicated: Callable[[str], bool] | None = None, *,
                 bucket: str, replicate_ddl: bool = False) -> None:
        self._writer = writer
        self._bucket = bucket  # the cluster's schema registry
        self._applier = applier
        self._js = js
        self._node_id = node_id
        self._replicas = replicas
        self._replicated = replicated
        self._replicate_ddl = replicate_ddl
        self._changed = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._published: dict[str, Any] | None = None
        self.view: dict[str, Any] = {}
        self.changes: dict[str, int] = {}  # replicated schema changes by state (replicate_ddl)
        self.last_error: str | None = None

    def notify_threadsafe(self) -> Callable[[], None]:
        """A callback for the watcher's thread: the schema moved."""
        def notify() -> None:
            self._loop.call_soon_threadsafe(self._changed.set)
        return notify

    async def run(self, stop: asyncio.Event) -> None:
        await self.refresh()
        while not stop.is_set():
            # Parked changes deferred until the schema settles are applied when it has.
            due = self._applier.unpark_wait() if self._applier is not None else None
            await wait_any(stop, self._changed, timeout=due)
            if stop.is_set():
                return
            if not self._changed.is_set():
                await self._apply_parked()
                continue
            self._changed.clear()
            log.info("the database schema changed: following it")
            try:
                await self.follow()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                # The application holds the write lock (a long migration): try again shortly.
                log.warning("cannot follow the schema change yet (retrying): %s", exc)
                await wait_any(stop, timeout=1.0)
                self._changed.set()

    async def _apply_parked(self) -> None:
        """Parked changes and refused dead letters the schema may take now (each deferred by
        the applier until the schema has settled)."""
        assert self._applier is not None
        applied = await self._writer.call(self._applier.retry_parked)
        if applied:
            log.info("%d parked changes applied after the schema change", applied)
        await self._writer.call(self._applier.retry_dead_letters)

    async def follow(self) -> None:
        if self._applier is not None:
            await self._apply_parked()
        else:
            replicated, node_id = self._replicated, self._node_id
            await self._writer.call(lambda conn: install(conn, replicated))
            if self._replicate_ddl:
                await self._writer.call(
                    lambda conn: schema_changes.capture_now(conn, node_id, replicated))
        await self.refresh()

    async def refresh(self) -> None:
        """Recompute this node's view; put it in the registry when it changed."""
        node_id = self._node_id

        def read(conn: sqlite3.Connection) -> dict[str, Any]:
            return schema_registry.local_view(conn, node_id)

        view = await self._writer.call(read)
        self.view = view
        schema = view.get("schema", {})
        self.changes = {"applied": schema["changes"], **{
            k: v for k, v in schema.items() if k not in ("hash", "changes")}} \
            if "changes" in schema else {}
        comparable = {k: v for k, v in view.items() if k != "updated_at"}
        if comparable == self._published:
            return
        try:
            await schema_registry.publish_view(self._js, self._bucket, node_id, view,
                                               self._replicas)
        except Exception as exc:  # NATS may be away; the next refresh tries again
            if str(exc) != self.last_error:
                log.warning("cannot publish this node's schema to %s: %s",
                            self._bucket, exc)
            self.last_error = str(exc)
            return
        self.last_error = None
        self._published = comparable

    def status(self) -> dict[str, Any]:
        parked: dict[str, int] = self.view.get("parked", {})
        tables = self.view.get("tables", {})
        return {
            "parked_changes": sum(parked.values()),
            "parked": dict(parked),
            # Tables whose incoming changes do not fit here yet: a migration this node lacks.
            "mismatched_tables": sorted(parked),
            "tables": {name: t["hash"] for name, t in tables.items()},
            "hash": self.view.get("schema", {}).get("hash", ""),
            "changes": self.changes,
        }
