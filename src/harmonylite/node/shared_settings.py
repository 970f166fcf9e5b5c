"""Settings every node of a cluster must share, recorded by the cluster and checked by each node.

A node whose shard count, compression or prefixes differ from its cluster's splits it silently:
rows it publishes on shards the others do not read never arrive, or its streams clash with the
cluster's. So the first node records the values in NATS (KV bucket ``harmonylite-cluster-settings``
under the cluster's namespace, key ``settings``, kept without TTL) and every node compares its own
with them:

- at start: a node that differs refuses to start (:class:`SettingsMismatch`, exit 2), naming each
  key, its value and the cluster's;
- while running (:class:`SettingsWatch`): when the record changes under it (the shard count
  changed while it was cut off from NATS) the node reports the difference on health (503) and
  publishes nothing (its changes wait in the database) until it is restarted with the new value.

``harmonylite shared-settings apply`` records new values (:mod:`harmonylite.node.settings_change`:
only the shard count may change, only while no node runs, leaving a cut).

The list :data:`SHARED` is the one place to declare a setting every node must share.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from nats.js import JetStreamContext
from nats.js.errors import (
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)
from nats.js.kv import KeyValue

from harmonylite.aio import Patience, wait_any
from harmonylite.bus.kv import bounded, open_bucket
from harmonylite.bus.names import SETTINGS_KEY, namespace
from harmonylite.config import Config
from harmonylite.errors import ConfigError, NatsError

log = logging.getLogger(__name__)

OP_TIMEOUT = 5.0
HISTORY = 16  # earlier records kept in the bucket: who changed what, when
WATCH_SECONDS = 2.0  # how often a running node looks at the record


@dataclass(frozen=True)
class Shared:
    key: str  # the dotted configuration key
    value: Callable[[Config], object]
    live_change: bool  # whether `shared-settings apply` may change it while nodes run
    # What a cluster recorded before the key was declared ran with (None: unknown, so such a
    # record is not compared for it).
    absent: object = None
    # Whether a node that differs would publish where the others do not read (or in a form
    # they do not expect): such a node holds its changes until restarted.
    splits: bool = True


SHARED: tuple[Shared, ...] = (
    Shared("replication_log.shards", lambda c: c.replication_log.shards, True),
    Shared("replication_log.compress", lambda c: c.replication_log.compress, False),
    Shared("nats.stream_prefix", lambda c: c.nats.stream_prefix, False),
    Shared("nats.subject_prefix", lambda c: c.nats.subject_prefix, False),
    # Recorded and applied by every node, or schema changes reach only some (a node that does
    # not replicate them ignores them); changed for a whole cluster with every node restarted.
    Shared("replicate_ddl", lambda c: c.replicate_ddl, True, absent=False, splits=False),
)


def own_settings(cfg: Config) -> dict[str, object]:
    return {s.key: s.value(cfg) for s in SHARED}


def toml_text(value: object) -> str:
    """A value as written in the configuration file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


@dataclass(frozen=True)
class Difference:
    key: str
    ours: object
    cluster: object

    def __str__(self) -> str:
        return (f"{self.key} = {toml_text(self.ours)} on this node, the cluster's is "
                f"{toml_text(self.cluster)}")


@dataclass(frozen=True)
class Record:
    settings: dict[str, object]
    retired: dict[str, str] = field(default_factory=dict)  # old stream -> its subject
    # Each stream's last sequence under the previous shard count: read up to it first.
    cut: dict[str, int] = field(default_factory=dict)
    node_id: int = 0  # the node (or command) that wrote it
    updated_at: float = 0.0
    revision: int = 0

    def encode(self) -> bytes:
        return json.dumps({"settings": self.settings, "retired": self.retired,
                           "cut": self.cut, "node_id": self.node_id, "updated_at": self.updated_at},
                          sort_keys=True).encode()

    @classmethod
    def decode(cls, raw: bytes, revision: int) -> Record:
        data = json.loads(raw)
        return cls(dict(data["settings"]), {str(k): str(v) for k, v in
                                            dict(data.get("retired") or {}).items()},
                   {str(k): int(v) for k, v in dict(data.get("cut") or {}).items()},
                   int(data.get("node_id", 0)), float(data.get("updated_at", 0)), revision)

    def differences(self, cfg: Config) -> list[Difference]:
        # A key the record lacks (declared after it was written) is compared with the value
        # clusters ran with before it existed, when there is one; otherwise not: the first
        # `shared-settings apply` records it.
        out = []
        for s in SHARED:
            theirs = self.settings.get(s.key, s.absent)
            ours = s.value(cfg)
            if theirs is not None and theirs != ours:
                out.append(Difference(s.key, ours, theirs))
        return out


class SettingsMismatch(ConfigError):
    """This node's shared settings differ from the cluster's (exit 2)."""

    def __init__(self, differences: list[Difference], where: str, advice: str) -> None:
        self.differences = differences
        first = differences[0]
        self.key, self.value, self.allowed = first.key, first.ours, advice
        Exception.__init__(self, "; ".join(map(str, differences)) + f" ({where}). {advice}")


def advice(differences: list[Difference]) -> str:
    keys = ", ".join(d.key for d in differences)
    if all(d.key == "replication_log.shards" for d in differences):
        return (f"Every node of a cluster must use the same {keys}: set the cluster's value in "
                "this node's configuration, or change it for the whole cluster with "
                "'harmonylite -config PATH shared-settings apply' (docs/operator-guide.md, "
                "\"Settings every node shares\")")
    return (f"Every node of a cluster must use the same {keys}: set the cluster's value in this "
            "node's configuration (changing it for a whole cluster: docs/operator-guide.md, "
            "\"Settings every node shares\")")


async def open_settings(js: JetStreamContext, cfg: Config) -> KeyValue:
    """The cluster's settings bucket (no TTL; as many replicas as the lease bucket)."""
    return await open_bucket(js, namespace(cfg).settings_bucket, 0, OP_TIMEOUT,
                             replicas=cfg.replication_log.replicas,
                             update_existing=cfg.replication_log.update_existing,
                             history=HISTORY)


async def read(kv: KeyValue) -> Record | None:
    try:
        entry = await bounded(kv.get(SETTINGS_KEY), OP_TIMEOUT)
    except KeyNotFoundError:
        return None
    if entry is None or not entry.value:
        return None
    return Record.decode(entry.value, entry.revision or 0)


async def _streams_say(js: JetStreamContext, cfg: Config) -> list[Difference]:
    """What the existing streams tell of the cluster's settings, for a cluster that has no
    record yet (its nodes ran an older version): the stream holding shard 1's subject."""
    names = namespace(cfg)
    try:
        holder = await bounded(js.find_stream_name_by_subject(names.subject(1)), OP_TIMEOUT)
    except NotFoundError:
        return []
    if holder == names.stream(1):
        return []
    prefix = cfg.nats.stream_prefix
    compressed = replace(names, compress=True).stream(1)
    if holder in (replace(names, compress=False).stream(1), compressed):
        return [Difference("replication_log.compress", cfg.replication_log.compress,
                           holder == compressed)]
    # Another prefix's stream holds our subject: two clusters with one subject prefix.
    theirs = holder.removesuffix("-1").removesuffix("-c")
    return [Difference("nats.stream_prefix", prefix, theirs)]


async def check_at_start(js: JetStreamContext, cfg: Config, timeout: float = 60.0) -> Record:
    """The cluster's record, this node's values recorded when there is none yet; raises
    :class:`SettingsMismatch` when they differ. NATS errors are retried for ``timeout``
    seconds (a JetStream cluster that is still electing its leader answers none)."""
    patience = Patience(timeout, 1.0)  # the retry period of an outside resource
    while True:
        try:
            return await _check(js, cfg)
        except SettingsMismatch:
            raise
        except Exception as exc:
            if patience.exhausted:
                raise NatsError(f"cannot read the cluster's shared settings (KV bucket "
                                f"{namespace(cfg).settings_bucket}): {exc}") from exc
            log.warning("cannot read the cluster's shared settings yet (retrying): %s", exc)
            await patience.wait()


async def _check(js: JetStreamContext, cfg: Config) -> Record:
    kv = await open_settings(js, cfg)
    record = await read(kv)
    if record is None:
        found = await _streams_say(js, cfg)
        if found:
            raise SettingsMismatch(found, "found in the existing streams", advice(found))
        record = Record(own_settings(cfg), node_id=cfg.node_id, updated_at=time.time())
        try:
            revision = await bounded(kv.create(SETTINGS_KEY, record.encode()), OP_TIMEOUT)
        except KeyWrongLastSequenceError:
            record = await read(kv) or record  # another node recorded them first
        else:
            log.info("recorded this cluster's shared settings: %s",
                     ", ".join(f"{k} = {toml_text(v)}" for k, v in record.settings.items()))
            return replace(record, revision=revision)
    differences = record.differences(cfg)
    if differences:
        raise SettingsMismatch(differences, f"recorded by node {record.node_id} in NATS KV "
                               f"bucket {namespace(cfg).settings_bucket}, key {SETTINGS_KEY}",
                               advice(differences))
    return record


def live_change(key: str) -> bool:
    """Whether ``key`` may change while the cluster's streams exist."""
    return next(s.live_change for s in SHARED if s.key == key)


def _splits(key: str) -> bool:
    return next((s.splits for s in SHARED if s.key == key), True)


class SettingsWatch:
    """A running node's look at the record: ``problem`` says how this node differs now."""

    def __init__(self, js: JetStreamContext, cfg: Config) -> None:
        self.js = js
        self.cfg = cfg
        self.problem: str | None = None
        self.hold: str | None = None  # the problem, when publishing now would split the cluster

    async def run(self, stop: asyncio.Event) -> None:
        kv: KeyValue | None = None
        while not stop.is_set():
            try:
                kv = kv or await open_settings(self.js, self.cfg)
                self._seen(await read(kv))
            except Exception as exc:  # NATS away: the last answer stands until it is back
                log.debug("cannot read the cluster's shared settings: %s", exc)
                kv = None
            await wait_any(stop, timeout=WATCH_SECONDS)  # the polling period, not a sync

    def _seen(self, record: Record | None) -> None:
        differences = record.differences(self.cfg) if record is not None else []
        problem = None
        splits = any(_splits(d.key) for d in differences)
        if differences:
            problem = ("; ".join(map(str, differences)) + ": the cluster's settings changed "
                       "since this node started; restart it with the cluster's values"
                       + (" (its changes are not published meanwhile)" if splits else ""))
        self.hold = problem if splits else None
        if problem != self.problem:
            if problem is not None:
                log.error("%s", problem, extra={"keys": [d.key for d in differences]})
            else:
                log.info("this node's shared settings match the cluster's again")
            self.problem = problem
