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
from typing import TYPE_CHECKING

from harmonylite.bus.connection import MIN_RECONNECT_WAIT, Connection
from harmonylite.cdc import takeover
from harmonylite.cdc.install import install

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node

log = logging.getLogger(__name__)


async def start_without_nats(node: Node, conn: Connection) -> asyncio.Task[None]:
    """Start capture (when the database exists) and return the task that starts the rest once
    NATS answers (it ends at once on the node's stop)."""
    cfg = node.cfg
    exists = node.db_path.exists()
    log.warning("%s; starting without it: %s, retrying every %.1f s", node.link.reason(),
                "changes are captured and published once it is reachable" if exists else
                "the database is created (or provisioned from a snapshot) once it is reachable",
                max(cfg.nats.reconnect_wait_seconds, MIN_RECONNECT_WAIT))
    if exists:
        await node.writer.call(lambda c: takeover.take_over(c, node.seq_map_path))
        node.install_report = await node.writer.call(
            lambda c: install(c, cfg.replicates_table))
        await node.writer.call(takeover.replay_pending)  # HarmonyLite's, through our capture
        log.info("change capture installed; waiting for NATS",
                 extra={"tables": len(node.install_report.tables)})
    else:
        node.waiting = "the database is created once NATS is reachable"
    return asyncio.get_running_loop().create_task(_start_when_reachable(node, conn))


async def _start_when_reachable(node: Node, conn: Connection) -> None:
    try:
        if not await conn.wait(node.stop_event):
            return
        log.info("connected to NATS after %.1f s unreachable", conn.outage)
        node.waiting = None
        await node.start_connected()
    except Exception as exc:
        # What a start that found NATS at once would have raised: the process ends with it.
        node.failure = exc
        log.error("cannot start replication: %s", exc)
        node.stop_event.set()
