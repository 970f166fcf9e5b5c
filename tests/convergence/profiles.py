"""Profiles: which tables, values, operations and faults a run uses.

``basic`` is what today's code is expected to handle; every other profile adds one feature so that
a failure names its bug class. ``all`` turns everything on.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

BASE_OPS: dict[str, int] = {"insert": 4, "update": 4, "delete": 2, "upsert": 3}


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    features: frozenset[str] = frozenset({"basic"})  # table groups (schema.Table.feature)
    values: str = "plain"  # plain | full | huge
    ops: dict[str, int] = field(default_factory=lambda: dict(BASE_OPS))
    faults: tuple[str, ...] = ("kill",)  # see faults.py for the kinds
    node_config: dict[str, Any] = field(default_factory=dict)
    hot_keys: int = 12  # small key space: rows written by every node at once
    migrations: bool = False
    # Each migration run by one node only (round robin), the others following it through
    # replicate_ddl; without it every node runs every migration (rolling).
    migrate_once: bool = False
    restart_after_migration: bool = False
    clock_offset: float = 0.0  # seconds node 1's snapshots are dated ahead (a fast clock)
    write_seconds: float = 10.0  # default length of the write phase (overridden by --minutes)
    embedded: bool = False  # each node its own embedded server, the three clustered
    reshard_to: int = 0  # the shard count the ``reshard`` fault changes to


def _ops(**extra: int) -> dict[str, int]:
    ops = dict(BASE_OPS)
    ops.update(extra)
    return ops


_P = Profile
PROFILES: dict[str, Profile] = {p.name: p for p in (
    _P("basic", "PK tables (integer, composite, WITHOUT ROWID), plain values, insert/update/"
       "delete/upsert, key changes, multi-table transactions and rollbacks from every node; "
       "SIGKILL + restart",
       ops=_ops(keychange=1, multi=2, rollback=1)),
    _P("values", "basic + SQLite's whole value domain (NULL, int64 bounds, ±0.0, 1e308, inf, "
       "text with NUL, invalid UTF-8, blobs, 200 KB values)", values="full", faults=()),
    _P("huge", "basic + a value over NATS's 1 MB payload limit", values="huge", faults=()),
    _P("unique", "a secondary UNIQUE column written with the same values from every node",
       features=frozenset({"basic", "unique"}), faults=()),
    _P("replace", "INSERT OR REPLACE over a table with a secondary UNIQUE column",
       features=frozenset({"basic", "unique"}), ops=_ops(replace=6), faults=()),
    _P("fk", "FOREIGN KEY ... ON DELETE CASCADE with PRAGMA foreign_keys=ON",
       features=frozenset({"basic", "fk"}), faults=()),
    _P("triggers", "an application trigger writing an audit row and updated_at",
       features=frozenset({"basic", "triggers"}), faults=()),
    _P("fts", "an FTS5 external-content index kept by the application's triggers; SIGKILL "
       "+ restart, and a brand-new node provisioned from a snapshot",
       features=frozenset({"basic", "fts"}), faults=("provision", "kill"),
       node_config={"snapshot": {"enabled": True, "store": "file", "interval": 1500}},
       write_seconds=12),
    _P("clone", "a new node started from a copy of a running node's database (a cloned "
       "disk, its own node_id), its application writing too; SIGKILL + restart",
       faults=("clone", "kill"), write_seconds=10),
    _P("shards_down", "the shard count lowered from 4 to 1 mid-run, the documented way: every "
       "node stopped (the applications keep writing), shared-settings apply, every node "
       "started", faults=("reshard",), node_config={"replication_log": {"shards": 4}},
       reshard_to=1, write_seconds=10),
    _P("shards_up", "the shard count raised from 1 to 4 the same way",
       faults=("reshard",), node_config={"replication_log": {"shards": 1}}, reshard_to=4,
       write_seconds=10),
    _P("idle", "every application idle for longer than the health limit (snapshots every "
       "1.5 s): every node's health stays 200 throughout", faults=("idle",),
       node_config={"snapshot": {"enabled": True, "store": "file", "interval": 1500}},
       write_seconds=12),
    _P("nocase", "a TEXT COLLATE NOCASE primary key written in different cases",
       features=frozenset({"basic", "nocase"}), faults=()),
    _P("nopk", "a table without a primary key: inserts, updates and deletes from every node",
       features=frozenset({"basic", "nopk"}), faults=()),
    _P("nopk_vacuum", "the table without a primary key, and VACUUM run by the application",
       features=frozenset({"basic", "nopk"}), ops=_ops(vacuum=1), faults=()),
    _P("schema", "rolling migrations online: ADD / RENAME / DROP COLUMN, CREATE TABLE then "
       "fill at once, table rebuild (create-copy-drop-rename)",
       features=frozenset({"basic", "schema"}), migrations=True, faults=(), write_seconds=14),
    _P("schema_restart", "the rolling migrations, each node's harmonylite restarted after "
       "its migration (the documented procedure)", features=frozenset({"basic", "schema"}),
       migrations=True, restart_after_migration=True, faults=(), write_seconds=14),
    _P("framework", "the rolling migrations as a framework runs them: each recorded in a "
       "per-node bookkeeping table (django_migrations, not replicated) and creating its model's "
       "row when missing (content types: auto-increment id, UNIQUE by name) on every node",
       features=frozenset({"basic", "schema", "framework"}), migrations=True, faults=(),
       write_seconds=14),
    _P("ddl", "replicated schema changes (replicate_ddl): each migration of the schema "
       "profile run once, on one node in turn, while every node writes (SIGKILL + restart); "
       "the others follow it",
       features=frozenset({"basic", "schema"}), migrations=True, migrate_once=True,
       faults=("kill",), node_config={"replicate_ddl": True}, write_seconds=14),
    _P("ddl_shards", "the replicated schema changes with 4 shards: schema changes travel on "
       "the first stream, the rows on all four",
       features=frozenset({"basic", "schema"}), migrations=True, migrate_once=True,
       faults=("kill",), node_config={"replicate_ddl": True,
                                      "replication_log": {"shards": 4}}, write_seconds=14),
    _P("ddl_provision", "the replicated schema changes, and a brand-new node provisioned "
       "from a snapshot (taken before some of the migrations) mid-run, beside SIGKILLs",
       features=frozenset({"basic", "schema"}), migrations=True, migrate_once=True,
       faults=("provision", "kill"),
       node_config={"replicate_ddl": True,
                    "snapshot": {"enabled": True, "store": "file", "interval": 1500}},
       write_seconds=14),
    _P("faults_stop", "basic + SIGSTOP/SIGCONT of nodes and a nats-server restart",
       faults=("stop", "nats", "kill")),
    _P("rollover", "small max_entries: a node killed while the streams roll over",
       faults=("rollover_kill",), node_config={"replication_log": {"max_entries": 64}},
       write_seconds=12),
    # Values of the whole domain (some of 150-200 KB): small rows alone fit in the stopped
    # process's socket buffers, which then hold what the stream drops and no gap ever forms.
    _P("rollover_stop", "small max_entries: a node SIGSTOPped while the streams roll over "
       "(large values: its socket buffers fill)", values="full",
       faults=("rollover_stop",), node_config={"replication_log": {"max_entries": 64}},
       write_seconds=12),
    _P("lock", "the application holds the write lock longer than the node's busy timeout",
       faults=("lock",), write_seconds=16),
    _P("rollover_snap", "a node killed while the streams roll over, with snapshots to cover it",
       faults=("rollover_kill",),
       node_config={"replication_log": {"max_entries": 64},
                    "snapshot": {"enabled": True, "store": "file", "interval": 2000}},
       write_seconds=12),
    _P("provision", "a brand-new node provisioned from a snapshot mid-run, beside SIGKILLs",
       faults=("provision", "kill"),
       node_config={"snapshot": {"enabled": True, "store": "file", "interval": 1500}},
       write_seconds=12),
    _P("clock", "node 1's clock 10 minutes fast; snapshots (keep 2) cover a node down across "
       "a roll-over and a brand-new node", faults=("rollover_kill", "provision"),
       node_config={"replication_log": {"max_entries": 64},
                    "snapshot": {"enabled": True, "store": "file", "interval": 1500, "keep": 2}},
       clock_offset=600.0, write_seconds=12),
    _P("restore", "an operator's forced restore of a stopped node (snapshot restore in place), "
       "beside SIGKILLs; snapshots every 1.5 s", faults=("restore", "kill"),
       node_config={"snapshot": {"enabled": True, "store": "file", "interval": 1500}},
       write_seconds=12),
    _P("archive", "the archive of the streams on (segments every 300 ms), beside SIGKILLs of "
       "the snapshot leader and others: once converged, archive verify passes and a restore "
       "to a point after the last change equals the nodes",
       faults=("kill",), ops=_ops(multi=2, rollback=1),
       node_config={"snapshot": {"enabled": True, "store": "file", "interval": 1500,
                                 "archive": True, "archive_interval": 300}},
       write_seconds=12),
    _P("disk", "a node's file system full for a while (a small tmpfs; root only), beside "
       "unique values and REPLACE", features=frozenset({"basic", "unique"}),
       ops=_ops(replace=2, multi=2), faults=("disk",), values="full", write_seconds=12),
    _P("cluster", "a 3-server JetStream cluster (each node's embedded server, clustered) with "
       "R3 streams: a node's server killed (its node restarts it), SIGKILL, SIGSTOP",
       faults=("nats", "kill", "stop"), embedded=True,
       node_config={"replication_log": {"replicas": 3}}, write_seconds=14),
    _P("all", "everything at once", values="full",
       features=frozenset({"basic", "unique", "fk", "triggers", "nocase", "nopk"}),
       ops=_ops(keychange=1, multi=2, rollback=1, replace=2, vacuum=1),
       faults=("kill", "stop", "nats", "lock"), write_seconds=20),
)}


def get(name: str) -> Profile:
    if name not in PROFILES:
        raise SystemExit(f"unknown profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[name]


def with_seconds(profile: Profile, seconds: float) -> Profile:
    return replace(profile, write_seconds=seconds)
