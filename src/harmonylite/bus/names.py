"""Every name a cluster uses in NATS, derived from its settings here and nowhere else.

Two clusters may share one NATS account when their ``[nats] stream_prefix`` differ (their
``subject_prefix`` must differ too, or their streams would claim the same subjects). Everything a
cluster keeps in NATS is then its own: streams and subjects carry the prefixes, the snapshot and
large-change object stores and the heartbeat buckets are named after ``stream_prefix``, and the
buckets that have fixed names in HarmonyLite (the lease bucket ``e-harmonylite``, the schema
registry) get the cluster's ``stream_prefix`` as a suffix. A cluster on the default
``stream_prefix`` keeps exactly the names HarmonyLite uses, so a node taken over from HarmonyLite
(or an older harmonylite) meets its cluster where it was.

The namespace is the ``stream_prefix``: the ``subject_prefix`` is one of the settings every node
must share (see :mod:`harmonylite.node.shared_settings`), so a node whose subject prefix differs
from its cluster's is told so rather than quietly kept apart.
"""

from __future__ import annotations

from dataclasses import dataclass

from harmonylite.config import DEFAULT_STREAM_PREFIX, DEFAULT_SUBJECT_PREFIX, Config

# HarmonyLite's fixed names, kept for the default namespace.
LEGACY_LEASE_BUCKET = "e-harmonylite"
LEGACY_SCHEMA_BUCKET = "harmonylite-schema-registry"
SETTINGS_BUCKET_BASE = "harmonylite-cluster-settings"

# Keys (inside the cluster's own buckets, so they need no prefix of their own).
LEASE_KEY = "snapshot-leader"  # the snapshot leader's lease
LOCK_KEY = "snapshot"  # the upload lock
REQUEST_KEY = "snapshot-request"  # a node asking the leader for a fresh snapshot
SETTINGS_KEY = "settings"  # the settings every node must share
NODE_KEY_PREFIX = "node-"  # see node_key


def namespace(cfg: Config) -> Namespace:
    """Every NATS name of ``cfg``'s cluster (streams, subjects, buckets, keys)."""
    return Namespace.from_config(cfg)


def node_key(node_id: int) -> str:
    """A node's own key in the lease (its node_id claim), schema and heartbeat buckets."""
    return f"{NODE_KEY_PREFIX}{node_id}"


def node_of(key: str) -> int | None:
    """The node id in a node's key (None for a key that is not one)."""
    if not key.startswith(NODE_KEY_PREFIX):
        return None
    try:
        return int(key[len(NODE_KEY_PREFIX):])
    except ValueError:
        return None


def kv_stream(bucket: str) -> str:
    """The JetStream stream behind KV bucket ``bucket``."""
    return f"KV_{bucket}"


def kv_subject(bucket: str, key: str) -> str:
    """The subject on which KV bucket ``bucket`` stores ``key``."""
    return f"$KV.{bucket}.{key}"


def obj_stream(bucket: str) -> str:
    """The JetStream stream behind object store bucket ``bucket``."""
    return f"OBJ_{bucket}"


def obj_chunks_subject(bucket: str, nuid: str) -> str:
    """The subject holding the chunks of the object ``nuid`` names in ``bucket``."""
    return f"$O.{bucket}.C.{nuid}"


def obj_meta_subjects(bucket: str) -> str:
    """The subjects holding the objects' descriptions (one per object) in ``bucket``."""
    return f"$O.{bucket}.M.>"


@dataclass(frozen=True)
class Namespace:
    """The NATS names of one cluster (see the module's docstring)."""

    stream_prefix: str = DEFAULT_STREAM_PREFIX
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    compress: bool = True
    shards: int = 1
    snapshot_bucket_override: str = ""  # [snapshot.nats] bucket, when set

    @classmethod
    def from_config(cls, cfg: Config) -> Namespace:
        return cls(stream_prefix=cfg.nats.stream_prefix, subject_prefix=cfg.nats.subject_prefix,
                   compress=cfg.replication_log.compress, shards=cfg.replication_log.shards,
                   snapshot_bucket_override=cfg.snapshot.nats.bucket)

    @property
    def is_default(self) -> bool:
        return self.stream_prefix == DEFAULT_STREAM_PREFIX

    def _own(self, base: str) -> str:
        return base if self.is_default else f"{base}-{self.stream_prefix}"

    # --- streams and subjects ---------------------------------------------------------------
    def stream(self, shard: int) -> str:
        infix = "-c" if self.compress else ""
        return f"{self.stream_prefix}{infix}-{shard}"

    def subject(self, shard: int) -> str:
        return f"{self.subject_prefix}-{shard}"

    def streams(self) -> list[str]:
        return [self.stream(s) for s in range(1, self.shards + 1)]

    def subjects(self) -> dict[str, str]:
        """Stream name -> its subject, for every shard."""
        return {self.stream(s): self.subject(s) for s in range(1, self.shards + 1)}

    # --- buckets ----------------------------------------------------------------------------
    @property
    def lease_bucket(self) -> str:
        """KV: the snapshot lease, the upload lock and snapshot requests (TTL = leader_ttl)."""
        return self._own(LEGACY_LEASE_BUCKET)

    @property
    def schema_bucket(self) -> str:
        """KV: each node's schema view (``schema status --cluster``)."""
        return self._own(LEGACY_SCHEMA_BUCKET)

    @property
    def settings_bucket(self) -> str:
        """KV: the settings every node must share, as the cluster recorded them (no TTL)."""
        return self._own(SETTINGS_BUCKET_BASE)

    @property
    def snapshot_bucket(self) -> str:
        """Object store of snapshots when ``snapshot.store = "nats"``."""
        return self.snapshot_bucket_override or f"{self.stream_prefix}-snapshot-store"

    @property
    def large_changes_bucket(self) -> str:
        """Object store of changes too large for one message."""
        return f"{self.stream_prefix}-large-changes"

    @property
    def heartbeat_bucket(self) -> str:
        """KV: each node's state, put about once a second (``cluster status``, the live page);
        keys expire an hour after a node's last beat."""
        return f"{self.stream_prefix}-heartbeats"

    @property
    def last_seen_bucket(self) -> str:
        """KV without TTL: each node's last heartbeat, kept every few seconds and at a clean
        stop, so a node that stopped beating stays in view until ``cluster forget``."""
        return f"{self.stream_prefix}-last-seen"

    def describe(self) -> dict[str, object]:
        """Every name, for logs and the ``shared-settings show`` command."""
        return {"streams": self.subjects(), "lease_bucket": self.lease_bucket,
                "schema_bucket": self.schema_bucket, "settings_bucket": self.settings_bucket,
                "snapshot_bucket": self.snapshot_bucket,
                "large_changes_bucket": self.large_changes_bucket,
                "heartbeat_bucket": self.heartbeat_bucket,
                "last_seen_bucket": self.last_seen_bucket}
