"""The health endpoint: ``GET {health_check.path}`` is 200 when the node is healthy, 503 if not.

A node is unhealthy when its database cannot be opened, NATS is disconnected (the node says why),
change capture is not installed, or, with snapshots enabled, the newest snapshot lacks a change
older than ``max_snapshot_age_intervals`` snapshot intervals (an idle database whose newest
snapshot holds every change stays healthy, see :mod:`harmonylite.snapshot.freshness`; a node that
does not know this goes by the snapshot's age), and when no snapshot exists yet and the node has
been up for longer than that. :func:`evaluate` decides this from a status dict and is pure.

The HTTP side is :mod:`harmonylite.ops.http_server` (aiohttp), which also serves the live page
of the cluster (:mod:`harmonylite.ops.cluster_page`) at ``/`` and the metrics endpoint.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import sqlite3
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harmonylite import __version__
from harmonylite.config import HealthCheckConfig
from harmonylite.ops.cluster_page import ClusterSource, cluster_routes
from harmonylite.ops.http_server import Handler, HttpServer, Response
from harmonylite.ops.http_server import parse_bind as parse_bind

log = logging.getLogger(__name__)

# --- time values -----------------------------------------------------------------------------
def to_epoch(value: object) -> float | None:
    """Seconds since the epoch from a number, a datetime or an RFC 3339 string; None if unknown."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value) if value > 0 and math.isfinite(value) else None
    if isinstance(value, datetime):
        dt = value if value.tzinfo else value.replace(tzinfo=UTC)
        return dt.timestamp()
    if isinstance(value, str) and value:
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            return None
        return to_epoch(dt)
    return None


def rfc3339(value: object) -> str | None:
    """RFC 3339 UTC text (millisecond precision) for a time value; None if unknown."""
    ts = to_epoch(value)
    if ts is None:
        return None
    dt = datetime.fromtimestamp(ts, UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


# --- evaluation ------------------------------------------------------------------------------
def snapshot_age_limit(cfg: HealthCheckConfig, snapshot_interval_ms: int) -> float | None:
    """Seconds after which the newest snapshot is stale; None when no limit applies."""
    if snapshot_interval_ms <= 0 or cfg.max_snapshot_age_intervals <= 0:
        return None
    return cfg.max_snapshot_age_intervals * snapshot_interval_ms / 1000


def evaluate(
    status: Mapping[str, Any],
    cfg: HealthCheckConfig,
    snapshot_interval_ms: int,
    enabled: bool,
    *,
    now: float | None = None,
) -> tuple[bool, dict[str, Any]]:
    """Decide health from a node status dict; returns ``(healthy, body)``.

    ``status`` holds what ``Node.status()`` returns plus ``db_connected`` and a ``snapshot``
    sub-dict (``leader``, ``last_id``, ``last_at``, optionally ``age_seconds``, ``last_error``).
    A missing boolean counts as false. ``body`` is the detailed JSON document; its ``reasons``
    list says why the node is unhealthy (empty when healthy).
    """
    now = time.time() if now is None else now
    reasons: list[str] = []
    db_connected = bool(status.get("db_connected", False))
    nats_connected = bool(status.get("nats_connected", False))
    cdc_installed = bool(status.get("cdc_installed", False))
    if not db_connected:
        reasons.append("database cannot be opened")
    if not nats_connected:
        # The node says why (e.g. "NATS unreachable at nats://…: connection refused").
        reasons.append(str(status.get("nats_error") or "NATS is disconnected"))
    if not cdc_installed:
        reasons.append("change capture is not installed")
    # Replication problems the node itself diagnosed: a stalled or dead consumer, a gap that
    # nothing covered, a task that keeps failing.
    reasons.extend(str(p) for p in status.get("problems") or ())

    uptime = _number(status.get("uptime_seconds")) or 0.0
    snap_in: Mapping[str, Any] = status.get("snapshot") or {}
    last_at = to_epoch(snap_in.get("last_at"))
    age = max(0.0, now - last_at) if last_at is not None else _number(snap_in.get("age_seconds"))
    limit = snapshot_age_limit(cfg, snapshot_interval_ms) if enabled else None
    # Freshness, when the node knows it: a snapshot is stale once a change it lacks is older
    # than the limit (an idle database keeps a fresh snapshot however old it is).
    tracked = "unsaved_change_at" in snap_in
    unsaved_at = to_epoch(snap_in.get("unsaved_change_at"))
    staleness = (max(0.0, now - unsaved_at) if unsaved_at is not None else 0.0) if tracked \
        else None
    if limit is not None:
        if staleness is not None:
            if staleness > limit:
                reasons.append(f"the newest snapshot lacks a change made {staleness:.0f} s ago "
                               f"(limit {limit:.0f} s)")
        elif age is not None and age > limit:
            reasons.append(f"newest snapshot is {age:.0f} s old (limit {limit:.0f} s)")
        elif age is None and uptime > limit:
            reasons.append(f"no snapshot after {uptime:.0f} s of uptime (limit {limit:.0f} s)")

    healthy = not reasons
    last_error = snap_in.get("last_error")
    body: dict[str, Any] = {
        "status": "healthy" if healthy else "unhealthy",
        "node_id": status.get("node_id"),
        "uptime_seconds": int(uptime),
        "db_connected": db_connected,
        "nats_connected": nats_connected,
        "cdc_installed": cdc_installed,
        "tables_tracked": int(status.get("tables_tracked") or 0),
        "last_replicated_event_timestamp": rfc3339(status.get("last_replicated_event_timestamp")),
        "last_published_event_timestamp": rfc3339(status.get("last_published_event_timestamp")),
        "version": str(status.get("version") or __version__),
        "snapshot": {
            "leader": bool(snap_in.get("leader", False)),
            "last_id": snap_in.get("last_id") or None,
            "last_at": rfc3339(last_at),
            "age_seconds": None if age is None else round(age, 3),
            "last_error": str(last_error) if last_error else None,
        },
        "reasons": reasons,
    }
    if staleness is not None:
        body["snapshot"]["staleness_seconds"] = round(staleness, 3)
    for extra in ("replication", "dead_letters", "conflicts", "schema", "warnings", "archive"):
        if extra in status:
            body[extra] = status[extra]
    return healthy, body


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


async def probe_database(path: str | Path, timeout: float = 2.0) -> bool:
    """True when the SQLite file at ``path`` opens and answers a query (off the event loop)."""

    def probe() -> bool:
        uri = Path(path).resolve().as_uri() + "?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=timeout)
        except sqlite3.Error:
            return False
        try:
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return True
        except sqlite3.Error:
            return False
        finally:
            conn.close()

    try:
        return await asyncio.wait_for(asyncio.to_thread(probe), timeout + 1.0)
    except TimeoutError:
        return False


# --- the health server -------------------------------------------------------------------------
StatusSource = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


def health_handler(
    cfg: HealthCheckConfig,
    status: StatusSource,
    *,
    snapshot_interval_ms: int = 0,
    snapshot_enabled: bool = False,
) -> Handler:
    """The request handler: evaluates ``status()`` on every request."""

    async def handle() -> Response:
        try:
            result = status()
            current = await result if inspect.isawaitable(result) else result
        except Exception as exc:
            log.warning("health status unavailable: %s", exc)
            current = {}
        healthy, body = evaluate(current, cfg, snapshot_interval_ms, snapshot_enabled)
        code = 200 if healthy else 503
        if cfg.detailed:
            return Response(code, json.dumps(body).encode() + b"\n", "application/json")
        text = "healthy\n" if healthy else "unhealthy: " + "; ".join(body["reasons"]) + "\n"
        return Response(code, text.encode())

    return handle


async def start_health_server(
    cfg: HealthCheckConfig,
    status: StatusSource,
    *,
    snapshot_interval_ms: int = 0,
    snapshot_enabled: bool = False,
    cluster: ClusterSource | None = None,
) -> HttpServer:
    """Serve ``GET {cfg.path}`` on ``cfg.bind``; ``server.port`` is the bound port. With
    ``cluster``, the live page of the cluster too, at ``/`` (its data at ``/cluster.json``)."""
    path = cfg.path if cfg.path.startswith("/") else "/" + cfg.path
    routes: dict[str, Handler] = {}
    if cluster is not None:
        routes.update(cluster_routes(cluster))
    routes[path] = health_handler(cfg, status, snapshot_interval_ms=snapshot_interval_ms,
                                  snapshot_enabled=snapshot_enabled)
    return await HttpServer(routes, "health check").start(cfg.bind, "health_check.bind")
