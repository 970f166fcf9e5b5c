"""Asking the snapshot leader for a fresh snapshot: key ``snapshot-request`` in the lease bucket.

A node whose streams dropped messages it never applied needs a snapshot at or past each stream's
first sequence. When none in the store covers it, it writes what it needs (per stream, the
sequence the snapshot must reach) under this key, again on every look at the store, and waits.
The leader reads the key each time it checks its triggers and takes a snapshot when its own
database can satisfy the request. The bucket's TTL (the lease TTL) removes a request whose node
stopped asking; the node deletes it once served.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from harmonylite.bus.kv import bounded, open_bucket, parse_value
from harmonylite.bus.names import LEASE_KEY, REQUEST_KEY

log = logging.getLogger(__name__)

OP_TIMEOUT = 5.0


@dataclass(frozen=True)
class SnapshotRequest:
    node_id: int
    need: dict[str, int]  # stream -> the last sequence the snapshot must contain, at least
    revision: int
    unsound: frozenset[str] = frozenset()  # snapshots the node found failing a check

    def satisfied_by(self, snapshot_id: str, sequences: dict[str, int]) -> bool:
        return snapshot_id not in self.unsound and \
            all(sequences.get(s, 0) >= q for s, q in self.need.items())


async def ask(js: JetStreamContext, bucket: str, ttl_ms: int, node_id: int, need: dict[str, int],
              unsound: set[str] | None = None) -> None:
    """Write (or refresh) the request for a snapshot reaching ``need`` on every stream, in the
    cluster's lease bucket ``bucket``, other than the ``unsound`` ones (which failed a check on
    the asking node: a new capture at the same position is wanted then)."""
    kv = await open_bucket(js, bucket, ttl_ms, OP_TIMEOUT)
    value = json.dumps({"node_id": node_id, "need": need,
                        "unsound": sorted(unsound or ())}).encode()
    await bounded(kv.put(REQUEST_KEY, value), OP_TIMEOUT)


async def withdraw(js: JetStreamContext, bucket: str, ttl_ms: int) -> None:
    kv = await open_bucket(js, bucket, ttl_ms, OP_TIMEOUT)
    await bounded(kv.delete(REQUEST_KEY), OP_TIMEOUT)


async def holder(js: JetStreamContext, bucket: str, ttl_ms: int) -> int | None:
    """The node holding the snapshot lease now (None: no node leads, so none will answer)."""
    kv = await open_bucket(js, bucket, ttl_ms, OP_TIMEOUT)
    try:
        entry = await bounded(kv.get(LEASE_KEY), OP_TIMEOUT)
    except KeyNotFoundError:  # deleted or expired markers included
        return None
    if entry is None or not entry.value:
        return None
    node = parse_value(entry.value).get("node_id")
    return node if isinstance(node, int) else None


async def read(kv: KeyValue, timeout: float = OP_TIMEOUT) -> SnapshotRequest | None:
    """The open request, if any (for the leader)."""
    try:
        entry = await bounded(kv.get(REQUEST_KEY), timeout)
    except KeyNotFoundError:
        return None
    if entry is None or not entry.value:
        return None
    try:
        data = json.loads(entry.value)
        need = {str(s): int(q) for s, q in dict(data.get("need", {})).items()}
        node_id = int(data.get("node_id", 0))
        unsound = frozenset(str(i) for i in data.get("unsound", ()))
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("ignoring an unreadable snapshot request: %s", exc)
        return None
    return SnapshotRequest(node_id, need, entry.revision or 0, unsound)
