"""Each node's heartbeat: its state, put in the cluster's heartbeat bucket about once a second.

The heartbeat bucket (``{stream_prefix}-heartbeats``, see :mod:`harmonylite.bus.names`) holds one
key per node, ``node-<id>``, whose value is the JSON record :mod:`harmonylite.node.heartbeat_state`
builds (health, streams, lease, newest snapshot, schema hashes, counts, file sizes, uptime) plus
the node's lag over the last 15 minutes. Its keys expire an hour after a node's last beat, so the
last-seen bucket (no TTL) gets the same record every few seconds and at a clean stop: a node that
stops beating stays in ``cluster status`` and on the page, shown as down with the time since it
was last seen, until an operator runs ``cluster forget``.

Both buckets are created like the lease bucket (three replicas where the servers allow it). The
publisher is a task of its own: every call is bounded, nothing is sent while NATS is
disconnected, and a failure is logged (once per distinct error) and retried on the next beat, so
a slow or absent NATS never holds up replication.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from harmonylite.aio import wait_any
from harmonylite.bus.kv import bounded, describe, open_bucket
from harmonylite.bus.names import node_key

log = logging.getLogger(__name__)

INTERVAL_SECONDS = 1.0  # between two beats
HEARTBEAT_TTL_MS = 3_600_000  # a heartbeat key outlives its node's last beat by an hour
LAST_SEEN_EVERY = 5.0  # seconds between two puts in the last-seen bucket
OP_TIMEOUT = 2.0  # bound on one KV call
HISTORY_STEP = 10.0  # seconds per point of the lag history
HISTORY_POINTS = 90  # 15 minutes of it


class LagHistory:
    """The node's lag in messages over the last 15 minutes: one point per 10 s, the most it
    was in that step (so a burst caught up within seconds still shows)."""

    def __init__(self, step: float = HISTORY_STEP, points: int = HISTORY_POINTS) -> None:
        self.step = step
        self.points: deque[tuple[float, int]] = deque(maxlen=points)

    def add(self, at: float, lag: int) -> None:
        slot = at - at % self.step
        if self.points and self.points[-1][0] == slot:
            self.points[-1] = (slot, max(self.points[-1][1], lag))
        else:
            self.points.append((slot, lag))

    def as_list(self) -> list[list[float | int]]:
        return [[t, lag] for t, lag in self.points]


@dataclass(frozen=True)
class Buckets:
    heartbeats: str
    last_seen: str
    replicas: int = 1
    update_existing: bool = False


Collect = Callable[[], Awaitable[dict[str, Any]]]


class HeartbeatPublisher:
    """Puts ``collect()`` in the heartbeat bucket every second (see the module's docstring)."""

    def __init__(self, js: JetStreamContext, node_id: int, buckets: Buckets, collect: Collect,
                 is_connected: Callable[[], bool], *,
                 interval: float = INTERVAL_SECONDS) -> None:
        self._js = js
        self.node_id = node_id
        self.key = node_key(node_id)
        self._buckets = buckets
        self._collect = collect
        self._connected = is_connected
        self.interval = interval
        self.history = LagHistory()
        self._kv: KeyValue | None = None
        self._seen_kv: KeyValue | None = None
        self._seen_at = 0.0
        self.last_error: str | None = None
        self.beats = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            if self._connected():
                await self.beat()
            await wait_any(stop, timeout=max(0.0, self.interval - (time.monotonic() - started)))
        if self._connected():
            await self.beat(stopped=True)  # a clean stop: down at once, and why

    async def beat(self, *, stopped: bool = False) -> None:
        """One heartbeat; a failure is logged and left to the next one."""
        try:
            record = await self.record(stopped=stopped)
            data = json.dumps(record, sort_keys=True).encode()
            if self._kv is None:
                self._kv = await self._open(self._buckets.heartbeats, HEARTBEAT_TTL_MS)
            await bounded(self._kv.put(self.key, data), OP_TIMEOUT)
            now = time.monotonic()
            if stopped or now - self._seen_at >= LAST_SEEN_EVERY:
                if self._seen_kv is None:
                    self._seen_kv = await self._open(self._buckets.last_seen, 0)
                await bounded(self._seen_kv.put(self.key, data), OP_TIMEOUT)
                self._seen_at = now
        except Exception as exc:
            text = describe(exc)
            if text != self.last_error:
                log.warning("cannot put this node's heartbeat in %s: %s (retrying every "
                            "second)", self._buckets.heartbeats, text)
            self.last_error = text
            self._kv = self._seen_kv = None  # reopened next time (a bucket deleted meanwhile)
            return
        if self.last_error is not None:
            log.info("heartbeats are being put in %s again", self._buckets.heartbeats)
        self.last_error = None
        self.beats += 1

    async def record(self, *, stopped: bool = False) -> dict[str, Any]:
        record = await self._collect()
        now = time.time()
        self.history.add(now, int(record.get("lag_messages") or 0))
        record.update(at=round(now, 3), stopped=stopped, lag_history=self.history.as_list())
        return record

    async def _open(self, bucket: str, ttl_ms: int) -> KeyValue:
        b = self._buckets
        return await open_bucket(self._js, bucket, ttl_ms, OP_TIMEOUT, replicas=b.replicas,
                                 update_existing=b.update_existing)
