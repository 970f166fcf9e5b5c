"""Recovery at start: decide whether this node must restore from a snapshot, and do it.

Called by the node after NATS is connected and the streams exist, before change capture is
installed. (Filled in by the recovery work: see the node's start sequence.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node


async def recover(node: Node) -> None:
    """Nothing to do yet: the node replays the streams from its sequence map."""
    return None
