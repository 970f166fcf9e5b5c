"""Reading the heartbeat and last-seen buckets (``cluster status``, the page), and forgetting a
node that left the cluster for good."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, KeyNotFoundError
from nats.js.kv import KeyValue

from harmonylite.bus.names import node_key, node_of
from harmonylite.cluster import view

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0  # bound on reading one bucket


async def read_bucket(js: JetStreamContext, bucket: str,
                      timeout: float = READ_TIMEOUT) -> list[dict[str, Any]]:
    """Every node's record in ``bucket`` ([] when the bucket does not exist yet)."""
    try:
        kv = await asyncio.wait_for(js.key_value(bucket), timeout)
    except BucketNotFoundError:
        return []
    # nats-py's KV watcher has no annotations: held as Any, its entries typed below.
    watcher: Any = await asyncio.wait_for(kv.watchall(ignore_deletes=True), timeout)
    out: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = max(0.1, deadline - time.monotonic())
            entry: KeyValue.Entry | None = await watcher.updates(timeout=left)
            if entry is None:
                break  # the initial values are all in
            if node_of(entry.key) is None:
                continue
            try:
                record = json.loads(entry.value or b"")
            except ValueError:
                log.warning("unreadable record %s in %s: skipped", entry.key, bucket)
                continue
            if isinstance(record, dict) and isinstance(record.get("node_id"), int):
                out.append(record)
            if not entry.delta:
                break
    finally:
        await watcher.stop()
    return out


async def read_records(js: JetStreamContext, heartbeats: str,
                       last_seen: str) -> list[dict[str, Any]]:
    """The records of both buckets (the view keeps each node's newest)."""
    beats, seen = await asyncio.gather(read_bucket(js, heartbeats), read_bucket(js, last_seen))
    return beats + seen


async def forget(js: JetStreamContext, buckets: tuple[str, ...], node_id: int) -> bool:
    """Remove ``node_id``'s records from ``buckets``; True when any was there."""
    found = False
    for bucket in buckets:
        try:
            kv = await asyncio.wait_for(js.key_value(bucket), READ_TIMEOUT)
        except BucketNotFoundError:
            continue
        try:
            await asyncio.wait_for(kv.get(node_key(node_id)), READ_TIMEOUT)
            found = True
        except KeyNotFoundError:
            continue
        await asyncio.wait_for(kv.purge(node_key(node_id)), READ_TIMEOUT)
    return found


class ClusterReader:
    """The cluster view for a server that answers many requests: read at most once per
    ``max_age`` seconds, whoever asks (the page polls every second from every open tab)."""

    def __init__(self, js: Callable[[], JetStreamContext | None], heartbeats: str,
                 last_seen: str, *, max_age: float = 1.0,
                 max_lag: int = view.DEFAULT_MAX_LAG) -> None:
        self._js = js
        self._buckets = (heartbeats, last_seen)
        self._max_age = max_age
        self._max_lag = max_lag
        self._records: list[dict[str, Any]] = []
        self._read_at = 0.0
        self._error: str | None = None
        self._lock = asyncio.Lock()

    async def document(self) -> dict[str, Any]:
        async with self._lock:
            if time.monotonic() - self._read_at >= self._max_age:
                await self._read()
        doc = view.build(self._records, max_lag=self._max_lag)
        if self._error is not None:
            doc["error"] = self._error
        return doc

    async def _read(self) -> None:
        js = self._js()
        if js is None:
            self._error = "this node is not connected to NATS yet"
            return
        try:
            self._records = await read_records(js, *self._buckets)
            self._error = None
        except Exception as exc:  # shown on the page with the records last read
            self._error = f"cannot read the heartbeats: {exc or type(exc).__name__}"
            log.warning("%s", self._error)
        self._read_at = time.monotonic()


Document = Callable[[], Awaitable[dict[str, Any]]]
