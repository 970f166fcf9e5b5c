"""The node's snapshot service: leadership and scheduling of snapshots.

Started by the node when ``publish`` and ``snapshot.enabled`` are both on; ``run`` lives until the
node stops, ``close`` releases what it holds.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node


class SnapshotService:
    def __init__(self, node: Node) -> None:
        self.node = node

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()

    async def close(self) -> None:
        return None
