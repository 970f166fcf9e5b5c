"""Every field of the detailed health document, and every reason that makes a node unhealthy.

A test reads the health document of a running node and fails when it holds a field missing here
(or this lists one it lacks); another fails when the code can give a reason this does not name.
``<stream>`` and ``<table>`` stand for names that vary.
"""

from __future__ import annotations

FIELDS: dict[str, str] = {
    "status": "`healthy` or `unhealthy`, as the HTTP status (200 or 503)",
    "node_id": "this node's id",
    "uptime_seconds": "whole seconds since the node started",
    "db_connected": "the database file opens and answers a query",
    "nats_connected": "the NATS connection is up",
    "cdc_installed": "change capture (triggers and change-log table) is installed",
    "tables_tracked": "tables with change capture",
    "last_replicated_event_timestamp": "when this node last applied changes from a stream "
                                       "(RFC 3339, UTC; `null` if never)",
    "last_published_event_timestamp": "when JetStream last acknowledged changes of this node "
                                      "(`null` if never)",
    "version": "harmonylite's version",
    "snapshot.leader": "this node holds the snapshot lease",
    "snapshot.last_id": "the newest committed snapshot this node knows of (any node's)",
    "snapshot.last_at": "when it was taken",
    "snapshot.age_seconds": "seconds since `last_at`",
    "snapshot.staleness_seconds": "seconds since the first change the newest snapshot lacks; 0 "
                                  "while it holds every change (present once the node knows the "
                                  "newest snapshot and follows the streams)",
    "snapshot.last_error": "the error of this node's latest failed snapshot, cleared by the next "
                           "success (credentials removed)",
    "replication.<stream>.applied_sequence": "the last sequence of the stream applied here",
    "replication.<stream>.stream_last_sequence": "the newest sequence the stream holds, as last "
                                                 "seen",
    "replication.<stream>.lag_messages": "messages behind",
    "replication.<stream>.lag_seconds": "while behind: the age of the last applied message",
    "replication.<stream>.stalled": "the transient error the consumer keeps retrying, or `null`",
    "replication.<stream>.consuming": "the node is subscribed to the stream (false while it "
                                      "re-creates a lost subscription)",
    "replication.<stream>.gap": "`[first, last]` of messages the stream dropped before this node "
                                "applied them, or `null`",
    "dead_letters": "changes that could not be applied here (`harmonylite dead-letters list`)",
    "conflicts": "rows displaced or overwritten by conflicts here (`harmonylite conflicts list`)",
    "warnings": "worth a look but healthy: dead letters, conflicts",
    "schema.parked_changes": "incoming changes waiting for a table or column this node lacks",
    "schema.parked": "those changes per table",
    "schema.mismatched_tables": "tables with parked changes: a migration this node has not run",
    "schema.tables": "this node's tables with the hash of their shape",
    "schema.hash": "a hash of the application's schema (tables, indexes, views, triggers): the "
                   "same on nodes with the same schema",
    "schema.changes": "with `replicate_ddl`: replicated schema changes here by state "
                      "(`applied`, `pending`, `sent`, `lost`, `refused`, `failed`); empty "
                      "without",
    "archive.writing": "with `snapshot.archive`: this node writes the archive (it holds the "
                       "snapshot lease)",
    "archive.newest_segment_age_seconds": "seconds since the server time of the newest "
                                          "archived message this node knows of (`null`: none)",
    "archive.last_error": "the store's last error while archiving, cleared by the next segment",
    "archive.streams.<stream>.archived_sequence": "the newest sequence of the stream archived",
    "archive.streams.<stream>.lag_messages": "messages the stream holds beyond the archive",
    "archive.streams.<stream>.gap": "`[first, last]` of messages the stream dropped before they "
                                    "were archived, or `null` (`archive verify` names it too)",
    "reasons": "why the node is unhealthy, one sentence each; empty when healthy",
}

# (how the reason begins, when it appears and what to do)
CAUSES: tuple[tuple[str, str], ...] = (
    ("database cannot be opened", "`db_path` is missing, unreadable or corrupt"),
    ("NATS is disconnected", "also while it reconnects; local writes stay pending meanwhile"),
    ("NATS unreachable at <urls>: <why>", "the node started without NATS and keeps trying; "
     "local writes stay pending ([starting while NATS is down]"
     "(jetstream-cluster.md#starting-while-nats-is-down))"),
    ("the database is created once NATS is reachable", "a node without a database file waits "
     "for NATS: it may have to be provisioned from a snapshot"),
    ("change capture is not installed", "the node is still starting, or installing failed "
                                        "(see its log)"),
    ("the newest snapshot lacks a change made N s ago (limit L s)", "no snapshot holds a change "
     "older than `max_snapshot_age_intervals` times `snapshot.interval` (an idle database stays "
     "healthy however old its snapshot): look at `snapshot.last_error`"),
    ("newest snapshot is N s old (limit L s)", "the same, on a node that does not follow the "
     "streams (`publish` or `replicate` false): it goes by the snapshot's age"),
    ("no snapshot after N s of uptime (limit L s)", "no snapshot exists yet after that limit"),
    ("apply stalled on <stream>", "a transient error (database locked, disk full, I/O) has "
                                  "stopped applying for over 5 s; it retries by itself. With "
                                  "`waiting for … (shard count changed)`: the stream waits "
                                  "until the old streams are applied up to the cut "
                                  "([operator guide](operator-guide.md#changing-the-shard-count))"),
    ("stream <stream> is not being consumed", "the subscription was lost (a NATS server died) "
                                              "and is being re-created"),
    ("stream <stream> dropped messages A..B before this node applied them",
     "restore the node from a snapshot that covers them ([recovery](recovery.md))"),
    ("task <name> keeps failing (N times in a row)",
     "a task failed 3 times in a row; it keeps being restarted (see the log for the error)"),
    ("waiting for a snapshot that covers this node (what it needs)",
     "the node must restore and asked the snapshot leader for a fresh snapshot"),
    ("no node can take snapshots", "as above, while no node holds the snapshot lease"),
    ("<key> = <value> on this node, the cluster's is <value>", "a setting every node shares was "
     "changed for the cluster (`shared-settings apply`) while this node was cut off from NATS: "
     "stop it and start it with the cluster's value "
     "([operator guide](operator-guide.md#settings-every-node-shares))"),
)
