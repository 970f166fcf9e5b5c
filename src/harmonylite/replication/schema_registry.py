"""Each node's schema, as the cluster sees it: table hashes, columns and parked changes.

Every node puts its view in the cluster's NATS Key-Value bucket (``harmonylite-schema-registry``
by default, see :mod:`harmonylite.bus.names`) under ``node-<id>`` at start, after each schema change
and when its parked changes change, so ``harmonylite schema status --cluster`` shows every node
side by side and marks the tables whose shape differs (a rolling migration in progress, or one
forgotten on a node).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from harmonylite import __version__
from harmonylite.bus.names import node_key
from harmonylite.cdc import schema_changes, schema_plan
from harmonylite.cdc.rows import table_hash
from harmonylite.cdc.schema import user_tables
from harmonylite.replication import parking

if TYPE_CHECKING:
    # The local view (``schema status``) needs no NATS client: its library is imported by the
    # functions that talk to the registry.
    from nats.js import JetStreamContext


@dataclass(frozen=True)
class TableView:
    name: str
    hash: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]


def local_view(conn: sqlite3.Connection, node_id: int) -> dict[str, Any]:
    """This database's schema and parked changes, as put in the registry."""
    tables, _ = user_tables(conn)
    return {
        "node_id": node_id,
        "version": __version__,
        "updated_at": round(time.time(), 3),
        "tables": {t.name: {"hash": table_hash(conn, t.name), "columns": list(t.columns),
                            "pk": list(t.pk)} for t in tables},
        "parked": parking.counts(conn),
        "schema": schema_version(conn),
    }


def schema_version(conn: sqlite3.Connection) -> dict[str, Any]:
    """How far this node's schema is: a hash of the application's schema objects and, with
    ``replicate_ddl``, the replicated schema changes it applied (and those lost, refused or
    failed here)."""
    out: dict[str, Any] = {"hash": schema_plan.schema_hash(schema_plan.objects(conn))}
    counts = schema_changes.counts(conn)
    if counts:
        out["changes"] = counts.get("applied", 0)
        out.update({k: v for k, v in counts.items() if k != "applied"})
    return out


def mismatches(views: dict[str, dict[str, Any]]) -> dict[str, dict[str, str | None]]:
    """Tables whose hash differs between nodes (or that some nodes lack): table -> node -> hash."""
    names = sorted({t for v in views.values() for t in v.get("tables", {})})
    out: dict[str, dict[str, str | None]] = {}
    for name in names:
        hashes = {node: (v.get("tables", {}).get(name) or {}).get("hash")
                  for node, v in views.items()}
        if len(set(hashes.values())) > 1:
            out[name] = hashes
    return out


async def publish_view(js: JetStreamContext, bucket: str, node_id: int, view: dict[str, Any],
                       replicas: int) -> None:
    """Put this node's view in the registry bucket ``bucket`` (created with the configured
    replicas)."""
    from nats.js.api import KeyValueConfig
    from nats.js.errors import BucketNotFoundError

    try:
        kv = await js.key_value(bucket)
    except BucketNotFoundError:
        kv = await js.create_key_value(KeyValueConfig(bucket=bucket, history=1,
                                                      replicas=replicas))
    await kv.put(node_key(node_id), json.dumps(view, sort_keys=True).encode())


async def cluster_views(js: JetStreamContext, bucket: str) -> dict[str, dict[str, Any]]:
    """Every node's view from the registry ``bucket`` (empty when no node published one yet)."""
    from nats.js.errors import BucketNotFoundError, NoKeysError

    try:
        kv = await js.key_value(bucket)
        keys = await kv.keys()
    except (BucketNotFoundError, NoKeysError):
        return {}
    views: dict[str, dict[str, Any]] = {}
    for key in sorted(keys):
        entry = await kv.get(key)
        if entry.value:
            views[key] = json.loads(entry.value)
    return views
