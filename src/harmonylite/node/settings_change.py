"""Recording new shared settings: ``harmonylite shared-settings apply``.

The first node's values become the cluster's. After that only the shard count may change, and
only while no node runs (a live node's claim in the lease bucket refuses it,
:class:`ShardChangeRefused`): a row's changes go to the stream its key hashes to, and under two
counts at once one row's changes would travel on two streams in no common order, so nodes would
end on different versions. The new record keeps the *cut*: each old stream's last sequence when
the count changed. Every node reads the old streams (the ones the new count drops are *retired*)
up to the cut before it applies anything after the cut on any stream (:class:`Cut`), so every
node applies a row's old changes before its new ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError, NotFoundError

from harmonylite.bus.kv import bounded, open_bucket, parse_value
from harmonylite.bus.names import NODE_KEY_PREFIX, SETTINGS_KEY, namespace
from harmonylite.config import Config
from harmonylite.errors import ConfigError
from harmonylite.node.shared_settings import (
    OP_TIMEOUT,
    Record,
    SettingsMismatch,
    live_change,
    open_settings,
    own_settings,
    read,
)


async def apply(js: JetStreamContext, cfg: Config) -> tuple[Record | None, Record]:
    """Record this configuration's shared settings as the cluster's (the old record, the new).

    Only ``replication_log.shards`` may change, and only while no node runs
    (:class:`ShardChangeRefused`); the streams it drops are retired, and each old stream's last
    sequence is kept as the cut. Another key that differs is refused (exit 2).
    """
    kv = await open_settings(js, cfg)
    old = await read(kv)
    ours = own_settings(cfg)
    if old is None:
        new = Record(ours, node_id=cfg.node_id, updated_at=time.time())
        revision = await bounded(kv.create(SETTINGS_KEY, new.encode()), OP_TIMEOUT)
        return None, replace(new, revision=revision)
    fixed = [d for d in old.differences(cfg) if not live_change(d.key)]
    if fixed:
        raise SettingsMismatch(fixed, "recorded for the cluster",
                               "This cannot be changed while the cluster's streams exist: see "
                               "docs/operator-guide.md, \"Settings every node shares\"")
    old_shards = int(str(old.settings.get("replication_log.shards", cfg.replication_log.shards)))
    retired, cut = old.retired, old.cut
    if old_shards != cfg.replication_log.shards:
        running = await live_nodes(js, cfg)
        if running:
            raise ShardChangeRefused(old_shards, cfg.replication_log.shards, running)
        before = replace(namespace(cfg), shards=old_shards)
        current = namespace(cfg).subjects()
        retired = {s: subj for s, subj in {**old.retired, **before.subjects()}.items()
                   if s not in current}
        cut = {**old.cut, **await _heads(js, [*before.streams(), *old.retired])}
    new = Record(ours, retired, cut, cfg.node_id, time.time())
    revision = await bounded(kv.update(SETTINGS_KEY, new.encode(), last=old.revision),
                             OP_TIMEOUT)
    return old, replace(new, revision=revision)


class ShardChangeRefused(ConfigError):
    """The shard count cannot change while nodes run (exit 2)."""

    def __init__(self, old: int, new: int, running: list[dict[str, Any]]) -> None:
        nodes = "; ".join(f"node {h.get('node_id')} (host {h.get('host')}, pid {h.get('pid')})"
                          for h in running)
        super().__init__(
            "replication_log.shards", new,
            f"the cluster's is {old}, and it can only change while every node is stopped; "
            f"running now: {nodes}. Stop every node, run 'harmonylite -config PATH "
            "shared-settings apply' again, then start the nodes with the new value "
            "(docs/operator-guide.md, \"Changing the shard count\"; a node that crashed is "
            "counted as running until its claim expires, snapshot.leader_ttl)")


async def live_nodes(js: JetStreamContext, cfg: Config) -> list[dict[str, Any]]:
    """The claims running nodes hold in the lease bucket (a crashed node's until it expires)."""
    kv = await open_bucket(js, namespace(cfg).lease_bucket, cfg.snapshot.leader_ttl, OP_TIMEOUT,
                           replicas=cfg.replication_log.replicas)
    try:
        keys = await bounded(kv.keys(), OP_TIMEOUT)
    except NoKeysError:
        return []
    found = []
    for key in sorted(k for k in keys if k.startswith(NODE_KEY_PREFIX)):
        try:
            entry = await bounded(kv.get(key), OP_TIMEOUT)
        except KeyNotFoundError:
            continue  # released meanwhile
        if entry is not None and entry.value:
            found.append(parse_value(entry.value) or {"node_id": key[len(NODE_KEY_PREFIX):]})
    return found


async def _heads(js: JetStreamContext, streams: list[str]) -> dict[str, int]:
    """Each existing stream's last sequence."""
    heads = {}
    for stream in dict.fromkeys(streams):
        try:
            info = await bounded(js.stream_info(stream), OP_TIMEOUT)
        except NotFoundError:
            continue
        heads[stream] = int(info.state.last_seq)
    return heads


class Cut:
    """Holds a node's consumers at the cut of the last shard-count change until every old
    stream it reads is applied up to its cut: a row's changes under the old count are then
    applied before its changes under the new one, on every node alike."""

    def __init__(self, cut: dict[str, int], positions: dict[str, int],
                 gaps: Callable[[], dict[str, tuple[int, int]]] = dict) -> None:
        self.cut = cut
        self.positions = positions  # the node's applied positions, kept current by the node
        # The node's gaps (stream -> first, last dropped): a stream that dropped what leads up
        # to its cut can never be applied up to it, and is not waited for (the gap is reported).
        self.gaps = gaps
        self.passed = not cut

    def after(self, stream: str) -> int:
        """The last sequence of ``stream`` a consumer may apply before the cut is passed."""
        return self.cut.get(stream, 0)

    def waiting_for(self, consumed: set[str]) -> list[str]:
        """The streams (of those consumed) not yet applied up to their cut."""
        if self.passed:
            return []
        gaps = self.gaps()
        behind = [f"{s} up to {last} (at {self.positions.get(s, 0)})"
                  for s, last in sorted(self.cut.items())
                  if s in consumed and self.positions.get(s, 0) < last
                  and gaps.get(s, (0, 0))[1] < last]
        self.passed = not behind
        return behind
