"""The configuration's tables as frozen dataclasses, with their defaults.

Keys, meanings and defaults follow HarmonyLite's (durations in milliseconds). How a TOML document
becomes these is in :mod:`harmonylite.config.checks` and :mod:`harmonylite.config.loading`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

# The NATS names of a cluster are derived from these in harmonylite.bus.names.
DEFAULT_STREAM_PREFIX = "harmonylite-changes"
DEFAULT_SUBJECT_PREFIX = "harmonylite-change-log"
# A KV bucket name allows these only; stream_prefix is part of bucket names, so it is held to it.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

STORES = ("nats", "s3", "sftp", "webdav", "file")
LOG_FORMATS = ("console", "json")
# What a node joining with rows of its own does when the cluster has a snapshot (docs/recovery.md).
JOIN_MODES = ("refuse", "replace", "merge")


@dataclass(frozen=True)
class ReplicationLogConfig:
    shards: int = 1
    max_entries: int = 1024
    replicas: int = 1
    compress: bool = True
    update_existing: bool = False


@dataclass(frozen=True)
class NatsStoreConfig:
    replicas: int = 1
    bucket: str = ""


@dataclass(frozen=True)
class S3Config:
    endpoint: str = ""
    bucket: str = ""
    path: str = ""
    region: str = ""
    force_path_style: bool = False
    use_ssl: bool = True
    access_key: str = ""
    secret: str = ""
    session_token: str = ""


@dataclass(frozen=True)
class SftpConfig:
    url: str = ""
    key_file: str = ""
    known_hosts: str = ""
    insecure_ignore_host_key: bool = False


@dataclass(frozen=True)
class WebdavConfig:
    url: str = ""


@dataclass(frozen=True)
class FileStoreConfig:
    path: str = ""


@dataclass(frozen=True)
class EncryptionConfig:
    recipients: list[str] = field(default_factory=list)  # age1… public keys: seal with these
    identity_file: str = ""  # AGE-SECRET-KEY-1… identities: open with these


@dataclass(frozen=True)
class SnapshotConfig:
    enabled: bool = True
    store: str = "nats"
    interval: int = 3_600_000
    leader_ttl: int = 30_000
    keep: int = 3
    compress: bool = True
    temp_dir: str = ""
    restore_timeout: int = 300_000  # ms a restore keeps trying while the application writes
    request_timeout: int = 120_000  # ms a node behind the streams waits for a fresh snapshot
    join: str = "refuse"  # a database with rows of its own and a snapshot: refuse|replace|merge
    archive: bool = False  # keep the change streams in the store as segments (point in time)
    archive_retention: int = 604_800_000  # ms of history kept: segments and snapshots
    archive_interval: int = 10_000  # ms a change may wait before its segment is stored
    nats: NatsStoreConfig = field(default_factory=NatsStoreConfig)
    s3: S3Config = field(default_factory=S3Config)
    sftp: SftpConfig = field(default_factory=SftpConfig)
    webdav: WebdavConfig = field(default_factory=WebdavConfig)
    file: FileStoreConfig = field(default_factory=FileStoreConfig)
    encryption: EncryptionConfig = field(default_factory=EncryptionConfig)


@dataclass(frozen=True)
class NatsConfig:
    urls: list[str] = field(default_factory=list)
    bind_address: str = ":-1"
    server_config: str = ""
    subject_prefix: str = DEFAULT_SUBJECT_PREFIX
    stream_prefix: str = DEFAULT_STREAM_PREFIX
    seed_file: str = ""
    user_name: str = ""
    user_password: str = ""
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    connect_retries: int = 5
    reconnect_wait_seconds: int = 2
    # nats-py shuffles the URL list by default; HarmonyLite's users expect the first URL first
    # (their own server, usually), so the list is tried in order unless this is set.
    randomize_urls: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    verbose: bool = False
    format: str = "console"


@dataclass(frozen=True)
class PrometheusConfig:
    enable: bool = False
    bind: str = ":3010"
    namespace: str = "harmonylite"
    subsystem: str = ""


@dataclass(frozen=True)
class HealthCheckConfig:
    enable: bool = False
    bind: str = "0.0.0.0:8090"
    path: str = "/health"
    detailed: bool = True
    # Unhealthy when the newest snapshot is older than this many snapshot intervals.
    max_snapshot_age_intervals: float = 3.0


@dataclass(frozen=True)
class ClusterFlags:
    """Command-line clustering of the embedded NATS server (not in the TOML file)."""

    cluster_addr: str = ""
    cluster_peers: list[str] = field(default_factory=list)
    leaf_servers: list[str] = field(default_factory=list)


# Tables that record which migrations a node applied: each node's own, so not replicated unless
# the configuration says otherwise (glob patterns, matched case-sensitively).
DEFAULT_EXCLUDED_TABLES = (
    "django_migrations", "alembic_version", "schema_migrations", "ar_internal_metadata",
    "knex_migrations", "knex_migrations_lock", "flyway_schema_history", "goose_db_version",
    "__EFMigrationsHistory", "_prisma_migrations",
)


@dataclass(frozen=True)
class Config:
    db_path: str = ""
    node_id: int = 0
    seq_map_path: str = ""
    publish: bool = True
    replicate: bool = True
    scan_max_changes: int = 512
    cleanup_interval: int = 5000
    sleep_timeout: int = 0
    polling_interval: int = 0
    exclude_tables: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_TABLES))
    include_tables: list[str] = field(default_factory=list)  # empty: every table
    # Schema changes replicate as statements (see cdc.schema_changes); every node must agree.
    replicate_ddl: bool = False
    replication_log: ReplicationLogConfig = field(default_factory=ReplicationLogConfig)
    snapshot: SnapshotConfig = field(default_factory=SnapshotConfig)
    nats: NatsConfig = field(default_factory=NatsConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    prometheus: PrometheusConfig = field(default_factory=PrometheusConfig)
    health_check: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    cluster: ClusterFlags = field(default_factory=ClusterFlags)


    def replicates_table(self, name: str) -> bool:
        """Whether changes to table ``name`` are captured and applied here."""
        if self.include_tables and not any(fnmatchcase(name, p) for p in self.include_tables):
            return False
        return not any(fnmatchcase(name, p) for p in self.exclude_tables)
