"""The cluster's lease bucket (``e-harmonylite`` by default, see :mod:`harmonylite.bus.names`) that
holds the snapshot lease, the upload lock and snapshot requests, and what they use on it:
periods, bounded calls, values.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig
from nats.js.errors import BucketNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from harmonylite.bus.names import kv_stream
from harmonylite.bus.streams import ensure_replicas

log = logging.getLogger(__name__)

MAX_BACKOFF_SECONDS = 10.0
LEASE_MIN_REPLICAS = 3  # the lease bucket's replicas where the servers allow (see open_bucket)
KV_OP_HEADER = "KV-Operation"

T = TypeVar("T")


def heartbeat_seconds(ttl_ms: int) -> float:
    """Renewal period of a lease whose TTL is ``ttl_ms``: a third of it, at least one second."""
    return max(1.0, ttl_ms / 3000.0)


def op_timeout_seconds(heartbeat: float) -> float:
    """Bound on one KV call: half a heartbeat, so a slow call fails long before the lease lapses."""
    return min(heartbeat / 2.0, 5.0)


def backoff_seconds(heartbeat: float, failures: int) -> float:
    """Wait before the next attempt after ``failures`` consecutive failures (0: one heartbeat)."""
    wait: float = heartbeat * (2 ** max(0, failures))
    return min(wait, max(MAX_BACKOFF_SECONDS, heartbeat))


def lease_value(node_id: int, token: str, **extra: Any) -> bytes:
    return json.dumps({"node_id": node_id, "since": time.time(), "token": token,
                       **extra}).encode()


def parse_value(raw: bytes | None) -> dict[str, Any]:
    """The JSON object a lease or lock value holds ({} when unreadable)."""
    try:
        data = json.loads(raw or b"")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, KeyWrongLastSequenceError):
        return "lease revision moved (taken by another node or expired)"
    return str(exc) or type(exc).__name__


async def bounded(aw: Awaitable[T], timeout: float) -> T:
    """Await ``aw`` for at most ``timeout`` seconds (TimeoutError after)."""
    return await asyncio.wait_for(aw, timeout)


async def open_bucket(js: JetStreamContext, bucket: str, ttl_ms: int, timeout: float, *,
                      replicas: int = 1, update_existing: bool = False,
                      history: int = 1) -> KeyValue:
    """KV bucket ``bucket`` (the cluster's lease bucket, or another of its buckets that must
    outlive a server), created with max_age = ``ttl_ms`` (0: none) when missing.

    It is created with ``replicas`` (``replication_log.replicas``), and with at least
    :data:`LEASE_MIN_REPLICAS` where the servers allow it: on a JetStream cluster an R1 lease
    bucket dies with its one server, and no node can take the lease until that server is back,
    however many nodes are left (the bucket holds two small keys: three copies cost nothing). A
    single server refuses more than one replica; then it gets ``replicas``. A cluster that is
    still forming (its peers not yet current) refuses too: the create is tried again for
    :data:`FORMING_WAIT_SECONDS` before settling for fewer, and a bucket left with fewer than
    the floor is raised to it by the next node that opens it once the servers allow. An existing
    bucket with fewer replicas than configured is raised when ``update_existing`` allows it,
    reported otherwise.
    """
    floor = max(replicas, LEASE_MIN_REPLICAS)
    try:
        kv = await bounded(js.key_value(bucket), timeout)
    except BucketNotFoundError:
        return await _create_bucket(js, bucket, ttl_ms, timeout, replicas, floor, history)
    if replicas > 1:
        await ensure_replicas(js, kv_stream(bucket), replicas, update_existing,
                              f"KV bucket {bucket}", timeout)
    if floor > replicas:
        await _raise_to_floor(js, bucket, floor, timeout)
    return kv


FORMING_WAIT_SECONDS = 10.0


async def _create_bucket(js: JetStreamContext, bucket: str, ttl_ms: int, timeout: float,
                         replicas: int, floor: int, history: int) -> KeyValue:
    loop = asyncio.get_running_loop()
    forming_until = loop.time() + FORMING_WAIT_SECONDS
    for want in dict.fromkeys((floor, replicas)):
        cfg = KeyValueConfig(bucket=bucket, history=history,
                             ttl=ttl_ms / 1000.0 if ttl_ms else None, replicas=want)
        while True:
            try:
                kv = await bounded(js.create_key_value(cfg), timeout)
            except Exception as exc:
                log.debug("creating KV bucket %s with %d replicas: %s", bucket, want, exc)
                if not _too_few_servers(exc):
                    # Created concurrently by another node (possibly with another TTL), or a
                    # create that timed out here but reached the servers: use theirs. A slow
                    # cluster never makes it fall back to one replica.
                    return await _open_existing(js, bucket, timeout, exc)
                if _clustered(exc) and want > replicas and loop.time() < forming_until:
                    await asyncio.sleep(0.5)  # peers not current yet: a forming cluster
                    continue
                if want > replicas and _clustered(exc):
                    log.warning("KV bucket %s gets %d replica(s), not %d: %s (a node that "
                                "opens it once the servers allow raises it)", bucket,
                                replicas, want, exc)
                break  # a single server, or a cluster short of servers: fewer replicas
            log.info("created KV bucket %s (TTL %s, %d replicas)", bucket,
                     f"{ttl_ms / 1000:.1f} s" if ttl_ms else "none", want)
            return kv
    return await bounded(js.key_value(bucket), timeout)


async def _raise_to_floor(js: JetStreamContext, bucket: str, floor: int, timeout: float) -> None:
    """Raise a bucket created with fewer replicas than the floor (a cluster that was forming
    then) when the servers allow it now; a single server or a short cluster keeps it as is."""
    info = await bounded(js.stream_info(kv_stream(bucket)), timeout)
    if (info.config.num_replicas or 1) >= floor or info.cluster is None or not info.cluster.name:
        return  # enough already, or a single server (no cluster name): nothing to raise
    try:
        await ensure_replicas(js, kv_stream(bucket), floor, True, f"KV bucket {bucket}", timeout)
    except Exception as exc:
        if not _too_few_servers(exc):
            raise
        log.debug("KV bucket %s stays below %d replicas: %s", bucket, floor, exc)


def _clustered(exc: BaseException) -> bool:
    """The refusal came from a JetStream cluster (not a single server, which never has more)."""
    return "not supported in non-clustered mode" not in str(exc).lower()


def _too_few_servers(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "replicas > 1 not supported" in text or "insufficient resources" in text \
        or "no suitable peers" in text


async def _open_existing(js: JetStreamContext, bucket: str, timeout: float,
                         cause: BaseException) -> KeyValue:
    try:
        return await bounded(js.key_value(bucket), timeout)
    except BucketNotFoundError:
        raise cause from None


async def bucket_ttl(js: JetStreamContext, bucket: str, timeout: float) -> float | None:
    """The bucket's max_age in seconds (None when unlimited)."""
    info = await bounded(js.stream_info(kv_stream(bucket)), timeout)
    age = info.config.max_age
    return float(age) if age else None

