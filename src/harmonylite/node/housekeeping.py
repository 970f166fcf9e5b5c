"""The node's periodic chores, every ``cleanup_interval``; and its stop when idle."""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import time
from collections.abc import Callable

from harmonylite.aio import wait_any
from harmonylite.cdc import changelog, ddl
from harmonylite.db.connection import DbThread, trim_wal
from harmonylite.node.schema_follow import SchemaFollower
from harmonylite.replication.apply import Applier
from harmonylite.replication.own_returns import OwnReturns

log = logging.getLogger(__name__)


def discard_unpublishable(conn: sqlite3.Connection) -> None:
    """publish = false: captured changes are never sent; mark them so they are pruned."""
    top = conn.execute(f"SELECT max(id) FROM {ddl.LOG}").fetchone()[0]
    if top is not None:
        changelog.mark_published(conn, int(top))


async def housekeeping(stop: asyncio.Event, writer: DbThread, *, interval: float, publish: bool,
                       applier: Applier | None, schema: SchemaFollower | None,
                       returns: OwnReturns | None = None) -> None:
    """Prune published changes (those back from the stream, see ``own_returns``), apply parked
    changes whose table or columns appeared meanwhile (even when no new message would notice),
    refresh the schema view. With publish = false, captured changes are dropped here, so the
    change log does not grow without bound."""
    failing: str | None = None
    while not stop.is_set():
        await wait_any(stop, timeout=interval)
        try:
            if not publish:
                await writer.call(discard_unpublishable)
                # No change watcher runs without publishing: the WAL is trimmed from here.
                await writer.call(lambda conn: trim_wal(conn, writer.path))
            pruned = await writer.call(functools.partial(
                changelog.prune, keep_from=returns.floor() if returns is not None else None))
            if pruned:
                log.debug("pruned %d published changes", pruned)
            if applier is not None:
                await writer.call(applier.retry_parked)
            if schema is not None:
                await schema.refresh()
            if failing is not None:
                log.info("housekeeping of the change log works again")
                failing = None
        except sqlite3.Error as exc:
            if str(exc) != failing:  # once per state change, not every interval
                log.warning("housekeeping of the change log failed (retried every %.1f s): %s",
                            interval, exc)
            failing = str(exc)


async def sleep_when_idle(stop: asyncio.Event, timeout: float,
                          activity: Callable[[], tuple[int, int]]) -> None:
    """sleep_timeout: stop the node (``stop``) after ``timeout`` seconds without publishing or
    applying (``activity``: changes published, changes applied)."""
    seen, since = activity(), time.monotonic()
    while not stop.is_set():
        await wait_any(stop, timeout=min(1.0, timeout))
        now = activity()
        if now != seen:
            seen, since = now, time.monotonic()
        elif time.monotonic() - since >= timeout:
            log.info("no activity for %.1f s (sleep_timeout): stopping", timeout)
            stop.set()
