"""What a node's heartbeat says about it: the record :mod:`harmonylite.cluster.heartbeat` puts.

Built from the same status the health endpoint evaluates, so ``cluster status``, the page and
``/health`` agree on whether a node is healthy and why not.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonylite import __version__
from harmonylite.config import Config
from harmonylite.ops.health import evaluate

StatusSource = Callable[[], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class Lease:
    """The snapshot lease as this node sees it."""

    holder: int | None  # node id in the lease (this node's when it leads)
    term: int  # this node's leadership terms so far
    leader: bool


LeaseSource = Callable[[], Lease | None]


def file_size(path: Path) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


def collector(cfg: Config, health_status: StatusSource,
              lease: LeaseSource) -> Callable[[], Awaitable[dict[str, Any]]]:
    """A function returning this node's heartbeat record (without the publisher's fields)."""
    host = socket.gethostname()
    db = Path(cfg.db_path)
    wal = db.with_name(db.name + "-wal")

    async def collect() -> dict[str, Any]:
        status = await health_status()
        healthy, body = evaluate(status, cfg.health_check, cfg.snapshot.interval,
                                 cfg.snapshot.enabled)
        streams: dict[str, dict[str, Any]] = dict(status.get("replication") or {})
        schema: Mapping[str, Any] = status.get("schema") or {}
        held = lease()
        snap = body["snapshot"]
        return {
            "node_id": cfg.node_id,
            "version": __version__,
            "host": host,
            "pid": os.getpid(),
            "publish": cfg.publish,
            "replicate": cfg.replicate,
            "healthy": healthy,
            "reasons": body["reasons"],
            "warnings": list(status.get("warnings") or ()),
            "uptime_seconds": body["uptime_seconds"],
            "started_at": round(time.time() - float(status.get("uptime_seconds") or 0), 3),
            "streams": streams,
            "lag_messages": sum(int(s.get("lag_messages") or 0) for s in streams.values()),
            "lag_seconds": max((float(s.get("lag_seconds") or 0) for s in streams.values()),
                               default=0.0),
            "lease": None if held is None else {"holder": held.holder, "term": held.term,
                                                "leader": held.leader},
            "snapshot": {"last_id": snap["last_id"], "age_seconds": snap["age_seconds"],
                         "leader": snap["leader"]},
            "schema": dict(schema.get("tables") or {}),
            "dead_letters": int(status.get("dead_letters") or 0),
            "conflicts": int(status.get("conflicts") or 0),
            "parked_changes": int(schema.get("parked_changes") or 0),
            "db_bytes": file_size(db),
            "wal_bytes": file_size(wal),
        }

    return collect
