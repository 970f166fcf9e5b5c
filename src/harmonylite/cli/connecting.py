"""How a command reaches NATS: the configured servers, or the embedded server of this store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from nats.js import JetStreamContext

from harmonylite.bus.connection import LinkState, connect
from harmonylite.config import Config
from harmonylite.errors import ConfigError
from harmonylite.node.embedded_nats import EmbeddedNats


@asynccontextmanager
async def default_js_context(cfg: Config) -> AsyncIterator[JetStreamContext]:
    """Connect to ``nats.urls``, or start the embedded server when none are configured."""
    embedded = None
    urls = list(cfg.nats.urls)
    if not urls:
        if not cfg.db_path:
            raise ConfigError("db_path", cfg.db_path, "is required to start the embedded NATS "
                              "server (or set nats.urls)")
        # The server already running on the store (the node's, or another command's) or one
        # started here: never a second one on the same JetStream directory, and never stopped
        # while another process uses it (node/server_lock.py).
        embedded = EmbeddedNats(node_id=cfg.node_id, db_path=Path(cfg.db_path),
                                nats=cfg.nats, cluster=cfg.cluster)
        urls = [await embedded.open()]
    try:
        link = LinkState()
        nc = await connect(cfg.nats, urls, f"harmonylite-{cfg.node_id}-snapshot", link)
        try:
            yield nc.jetstream()
        finally:
            link.closing = True  # the command's own close: no "disconnected from NATS" warning
            await nc.close()
    finally:
        if embedded is not None:
            await embedded.close()
