"""The node's process: run a node until a signal stops it, starting it over in the same process
when it asks to (a gap found while running, with snapshots on: see ``node.progress``)."""

from __future__ import annotations

import asyncio
import logging
import signal

from harmonylite.config import Config
from harmonylite.node.daemon import Node

log = logging.getLogger(__name__)


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
