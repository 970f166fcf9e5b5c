"""What each configuration key means, for docs/configuration.md and docs/config.example.toml.

Types, defaults, ranges and choices come from :mod:`harmonylite.config`; only the meaning is
written here. The unit tests fail when a key of the configuration dataclasses has no entry here,
or an entry names a key that does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KeyDoc:
    text: str
    # The same value on every node of a cluster: the nodes otherwise split (different streams or
    # shards), or do not find each other's snapshots.
    shared: bool = False


SECTIONS: dict[str, str] = {
    "": "Top level",
    "replication_log": "`[replication_log]`: the change streams",
    "snapshot": "`[snapshot]`",
    "snapshot.nats": "`[snapshot.nats]`: store snapshots in the NATS Object Store",
    "snapshot.s3": "`[snapshot.s3]`: store snapshots in S3 (AWS, MinIO, SeaweedFS…)",
    "snapshot.sftp": "`[snapshot.sftp]`",
    "snapshot.webdav": "`[snapshot.webdav]`",
    "snapshot.file": "`[snapshot.file]`: a local or mounted directory",
    "snapshot.encryption": "`[snapshot.encryption]`: seal stored snapshots with age "
                           "([encryption.md](encryption.md))",
    "nats": "`[nats]`",
    "logging": "`[logging]`",
    "prometheus": "`[prometheus]`",
    "health_check": "`[health_check]`",
}

KEYS: dict[str, KeyDoc] = {
    "db_path": KeyDoc("The SQLite database to replicate. Required to run a node."),
    "node_id": KeyDoc("This node's id, unique in the cluster. 0: derived from the machine id "
                      "(unique per machine, not per database). `-node-id` overrides it."),
    "seq_map_path": KeyDoc("Where the last applied stream sequences are mirrored. Empty: "
                           "`seq-map.cbor` beside `db_path`. Removing it (node stopped) forces a "
                           "snapshot check at the next start."),
    "publish": KeyDoc("Publish this node's changes. Changes written while false are never sent."),
    "replicate": KeyDoc("Apply the other nodes' changes. A node that does not replicate never "
                        "leads snapshots."),
    "scan_max_changes": KeyDoc("Changes read from the change log at a time: a publish batch "
                               "(everything pending when it begins, so never part of a "
                               "transaction) is read and sent in chunks of this many."),
    "cleanup_interval": KeyDoc("Milliseconds between prunings of change-log rows that were "
                               "published and came back from the stream (also how often "
                               "parked changes are retried)."),
    "sleep_timeout": KeyDoc("Milliseconds without publishing or applying after which the node "
                            "stops (exit 0); the snapshot leader first takes a final snapshot. "
                            "0: never."),
    "polling_interval": KeyDoc("Milliseconds between looks at the database for new commits, "
                               "and the shortest time between two batches the node publishes "
                               "(commits made meanwhile go out together). 0: 5 ms."),
    "exclude_tables": KeyDoc("Tables not replicated (glob patterns, case-sensitive). The default "
                             "lists the migration bookkeeping tables of common frameworks "
                             "(with `replicate_ddl = true` the default is empty: they "
                             "replicate with the schema); setting the key replaces the list.",
                             shared=True),
    "include_tables": KeyDoc("Only these tables are replicated (glob patterns), before "
                             "`exclude_tables` applies. Empty: every table.", shared=True),
    "replicate_ddl": KeyDoc("Replicate schema changes: DDL run on any one node is replayed on "
                            "every other, in order with the rows (docs/schema-migrations.md, "
                            "\"Replicated schema changes\"). false: each node runs its own "
                            "migrations (rolling migrations).", shared=True),
    "replication_log.shards": KeyDoc("Streams the changes are spread over; a row goes to "
                                     "hash(table, key) % shards.", shared=True),
    "replication_log.max_entries": KeyDoc("Messages each stream keeps. A node down for longer "
                                          "than it takes to write this many restores from a "
                                          "snapshot.", shared=True),
    "replication_log.replicas": KeyDoc("JetStream replicas of the streams and buckets: 3 on a "
                                       "3-server cluster.", shared=True),
    "replication_log.compress": KeyDoc("zstd-compress messages; the streams are then named "
                                       "`{stream_prefix}-c-{shard}`.", shared=True),
    "replication_log.update_existing": KeyDoc("Change an existing stream or bucket whose limits "
                                              "or replicas differ from these."),
    "snapshot.enabled": KeyDoc("Take part in snapshots (leading, restoring at start)."),
    "snapshot.store": KeyDoc("Where snapshots are kept.", shared=True),
    "snapshot.interval": KeyDoc("Milliseconds between snapshots (a snapshot is also taken every "
                                "`max_entries / 2` messages on any stream). 0: no timer.",
                                shared=True),
    "snapshot.leader_ttl": KeyDoc("Milliseconds the snapshot leader's lease lives without "
                                  "renewal; renewed every third of it. Raise it when leadership "
                                  "flaps.", shared=True),
    "snapshot.keep": KeyDoc("Committed snapshots kept in the store.", shared=True),
    "snapshot.compress": KeyDoc("zstd-compress stored snapshots."),
    "snapshot.temp_dir": KeyDoc("Work space for captures and restores (room for one database "
                                "copy). Empty: the OS temp dir."),
    "snapshot.restore_timeout": KeyDoc("Milliseconds a restore keeps trying while the "
                                       "application holds the write lock or keeps writing; then "
                                       "it gives up with the database untouched."),
    "snapshot.request_timeout": KeyDoc("Milliseconds between reminders while a node that needs a "
                                       "snapshot waits for the leader to take one."),
    "snapshot.join": KeyDoc("A node whose database has rows of its own (no positions on the "
                            "cluster's streams) that the cluster's snapshot lacks: `refuse` to "
                            "start, `replace` them by the snapshot, or `merge` them into it as "
                            "this node's changes; both keep a copy of the old file. `-join` "
                            "overrides it."),
    "snapshot.archive": KeyDoc("Keep every change of the streams in the snapshot store as "
                               "compressed, checksummed segments, written by the snapshot "
                               "leader, so a database can be restored to any point in time "
                               "inside `archive_retention` ([point in time](point-in-time.md)).",
                               shared=True),
    "snapshot.archive_retention": KeyDoc("With `archive`: milliseconds of history kept. "
                                         "Snapshots newer than this, and the newest one older, "
                                         "are kept (at least `keep`), and segments from that "
                                         "oldest snapshot on, so the history has no hole.",
                                         shared=True),
    "snapshot.archive_interval": KeyDoc("With `archive`: milliseconds a change may wait before "
                                        "its segment is stored (a segment is also stored at "
                                        "20000 messages or 16 MiB). The archive trails the "
                                        "streams by about this much."),
    "snapshot.nats.replicas": KeyDoc("Replicas of the snapshot object store.", shared=True),
    "snapshot.nats.bucket": KeyDoc("Object store bucket. Empty: "
                                   "`{stream_prefix}-snapshot-store`.", shared=True),
    "snapshot.s3.endpoint": KeyDoc("`host[:port]` or a URL. Empty: AWS.", shared=True),
    "snapshot.s3.bucket": KeyDoc("Bucket; created when missing (needs `s3:CreateBucket`). "
                                 "Required with `store = \"s3\"`.", shared=True),
    "snapshot.s3.path": KeyDoc("Key prefix inside the bucket.", shared=True),
    "snapshot.s3.region": KeyDoc("Region."),
    "snapshot.s3.force_path_style": KeyDoc("Path-style addressing: true for MinIO and "
                                           "SeaweedFS."),
    "snapshot.s3.use_ssl": KeyDoc("HTTPS when the endpoint has no scheme."),
    "snapshot.s3.access_key": KeyDoc("Access key. Empty: the AWS default credential chain "
                                     "(environment, profile, instance role)."),
    "snapshot.s3.secret": KeyDoc("Secret key; write `${VAR}` to read it from the environment."),
    "snapshot.s3.session_token": KeyDoc("Session token of temporary credentials."),
    "snapshot.sftp.url": KeyDoc("`sftp://user[:password]@host:port/path`. Required with "
                                "`store = \"sftp\"`.", shared=True),
    "snapshot.sftp.key_file": KeyDoc("Private key file, instead of or besides the password."),
    "snapshot.sftp.known_hosts": KeyDoc("known_hosts file. Empty: `~/.ssh/known_hosts`."),
    "snapshot.sftp.insecure_ignore_host_key": KeyDoc("Skip the host key check (never in "
                                                     "production)."),
    "snapshot.webdav.url": KeyDoc("`http(s)://host/path?dir=/snapshots&login=user&secret=pass`. "
                                  "Required with `store = \"webdav\"`.", shared=True),
    "snapshot.file.path": KeyDoc("Directory. Required with `store = \"file\"`.", shared=True),
    "snapshot.encryption.recipients": KeyDoc("age X25519 public keys (`age1…`). When set, "
                                             "every object stored from then on (snapshot data, "
                                             "archive segments) is sealed to all of them; "
                                             "manifests stay plain and carry no row data. "
                                             "Empty: objects are stored plain."),
    "snapshot.encryption.identity_file": KeyDoc("A file of age identities "
                                                "(`AGE-SECRET-KEY-1…`, one a line, as "
                                                "`age-keygen` writes them) that open sealed "
                                                "objects; list old identities beside new ones "
                                                "after a rotation. Empty: this node cannot "
                                                "restore a sealed snapshot."),
    "nats.urls": KeyDoc("NATS servers to connect to. Empty: start the embedded NATS server "
                        "(see the `-cluster-*` flags)."),
    "nats.bind_address": KeyDoc("Client address of the embedded server. `:-1`: 127.0.0.1, a "
                                "free port."),
    "nats.server_config": KeyDoc("A nats-server configuration file laid over the embedded "
                                 "server's generated one (the file wins where both set a "
                                 "value)."),
    "nats.subject_prefix": KeyDoc("Prefix of the change subjects: a NATS subject without "
                                  "wildcards.", shared=True),
    "nats.stream_prefix": KeyDoc("The cluster's namespace: every stream, bucket and key it uses "
                                 "in NATS derives from it (letters, digits, `-` and `_`). Two "
                                 "clusters on one NATS account differ in both prefixes.",
                                 shared=True),
    "nats.seed_file": KeyDoc("NKEY seed file."),
    "nats.user_name": KeyDoc("User name."),
    "nats.user_password": KeyDoc("Password; write `${VAR}` to read it from the environment."),
    "nats.ca_file": KeyDoc("CA certificate(s) to verify the servers (TLS)."),
    "nats.cert_file": KeyDoc("Client certificate (TLS)."),
    "nats.key_file": KeyDoc("Client certificate's key (TLS)."),
    "nats.connect_retries": KeyDoc("Attempts at start before the node starts without NATS "
                                   "(capture on, changes pending, retried forever). Refused "
                                   "credentials this many times + 1 in a row end the process "
                                   "(exit 1)."),
    "nats.reconnect_wait_seconds": KeyDoc("Seconds between attempts, at start and after a lost "
                                          "connection."),
    "nats.randomize_urls": KeyDoc("Shuffle `urls`. false: try them in order (list this node's "
                                  "nearest server first)."),
    "logging.verbose": KeyDoc("Debug lines."),
    "logging.format": KeyDoc("`console`, or `json`: one object per line with time, level, "
                             "message and node_id."),
    "prometheus.enable": KeyDoc("Serve metrics on `GET /metrics`."),
    "prometheus.bind": KeyDoc("`HOST:PORT` or `:PORT` of the metrics server."),
    "prometheus.namespace": KeyDoc("First part of every metric name."),
    "prometheus.subsystem": KeyDoc("Second part of every metric name, when set."),
    "health_check.enable": KeyDoc("Serve the health endpoint."),
    "health_check.bind": KeyDoc("`HOST:PORT` or `:PORT` of the health server."),
    "health_check.path": KeyDoc("Path of the health endpoint."),
    "health_check.detailed": KeyDoc("A JSON body; false: one line of text."),
    "health_check.max_snapshot_age_intervals": KeyDoc("Unhealthy when a change the newest "
                                                      "snapshot lacks is older than this many "
                                                      "`snapshot.interval`s (an idle database "
                                                      "stays healthy). 0: no check."),
}
