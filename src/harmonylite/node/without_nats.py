"""Starting a node while NATS is unreachable (after ``nats.connect_retries`` more attempts).

The application keeps writing, so what needs no NATS starts now: HarmonyLite's layout is taken
over and change capture is installed, and the changes stay pending in the change log. The rest of
the start (streams, start-up recovery, consumers, publisher, snapshot service) runs in the
background once the connection, retried forever, works; the publisher then sends what was
written meanwhile, in order.

A node without a database waits for NATS before creating one: it may have to be provisioned from
a snapshot, which only NATS (the streams and the store) can tell.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from harmonylite.bus.connection import MIN_RECONNECT_WAIT, Connection
from harmonylite.cdc import takeover
from harmonylite.cdc.install import InstallReport, install
from harmonylite.config import Config
from harmonylite.db.connection import DbThread

log = logging.getLogger(__name__)


async def start_without_nats(cfg: Config, db_path: Path, seq_map_path: Path, writer: DbThread,
                             conn: Connection) -> InstallReport | None:
    """Start capture when the database exists; its report (None: the database comes later)."""
    exists = await asyncio.to_thread(db_path.exists)
    log.warning("%s; starting without it: %s, retrying every %.1f s", conn.state.reason(),
                "changes are captured and published once it is reachable" if exists else
                "the database is created (or provisioned from a snapshot) once it is reachable",
                max(cfg.nats.reconnect_wait_seconds, MIN_RECONNECT_WAIT))
    if not exists:
        return None
    await writer.call(lambda c: takeover.take_over(c, seq_map_path))
    report = await writer.call(lambda c: install(c, cfg.replicates_table))
    await writer.call(takeover.replay_pending)  # HarmonyLite's, through our capture
    log.info("change capture installed; waiting for NATS", extra={"tables": len(report.tables)})
    return report


async def start_when_reachable(conn: Connection, stop: asyncio.Event,
                               start: Callable[[], Awaitable[None]],
                               waiting: Callable[[str | None], None],
                               failed: Callable[[BaseException], None]) -> None:
    """Wait for NATS (or the stop), then ``start`` the rest; a failure ends the process."""
    try:
        if not await conn.wait(stop):
            return
        log.info("connected to NATS after %.1f s unreachable", conn.outage)
        waiting(None)
        await start()
    except Exception as exc:
        # What a start that found NATS at once would have raised: the process ends with it.
        failed(exc)
        log.error("cannot start replication: %s", exc)
        stop.set()
