"""TOML configuration turned into frozen dataclasses.

Keys, meanings and defaults follow HarmonyLite's (durations in milliseconds). Every error names the
dotted key, the value found and what is allowed; unknown keys are returned as warnings so that the
caller can log them once logging is set up.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from harmonylite.age_keys import check_recipients, load_identities
from harmonylite.errors import ConfigError

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


# Allowed ranges for integer keys: dotted key -> (minimum, maximum or None).
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    # HarmonyLite's node ids are unsigned 64-bit (its default, a hash of the machine id, is
    # often above 2**63 - 1); 0 means "derive it from the machine id".
    "node_id": (0, 2**64 - 1),
    "scan_max_changes": (1, 1_000_000),
    "cleanup_interval": (1, None),
    "sleep_timeout": (0, None),
    "polling_interval": (0, None),
    "replication_log.shards": (1, 1024),
    "replication_log.max_entries": (1, None),
    "replication_log.replicas": (1, 5),
    "snapshot.interval": (0, None),
    "snapshot.leader_ttl": (3000, None),
    "snapshot.keep": (1, 10_000),
    "snapshot.restore_timeout": (0, None),
    "snapshot.request_timeout": (0, None),
    "snapshot.archive_retention": (1000, None),
    "snapshot.archive_interval": (10, None),
    "snapshot.nats.replicas": (1, 5),
    "nats.connect_retries": (0, None),
    "nats.reconnect_wait_seconds": (0, None),
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "snapshot.store": STORES,
    "logging.format": LOG_FORMATS,
    "snapshot.join": JOIN_MODES,
}


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "a boolean (true or false)"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if typing.get_origin(tp) is list:
        return "an array of strings"
    return "a table"


def _check_type(key: str, value: Any, tp: Any) -> Any:
    ok: bool
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is list:
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:  # pragma: no cover - every field type is listed above
        raise TypeError(tp)
    if not ok:
        raise ConfigError(key, value, f"must be {_type_name(tp)}")
    if key.lstrip("-").replace("-", "_") in _INT_RANGES:
        lo, hi = _INT_RANGES[key.lstrip("-").replace("-", "_")]
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(key, value, f"must be an integer {allowed}")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(key, value, "must be one of " + ", ".join(_CHOICES[key]))
    return value


def _build(cls: type[Any], data: dict[str, Any], prefix: str, warnings: list[str]) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names or name == "cluster":
            warnings.append(f"unknown configuration key {key!r} ignored")
            continue
        tp = hints[name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(key, value, "must be a table")
            kwargs[name] = _build(tp, value, key + ".", warnings)
        else:
            kwargs[name] = _check_type(key, value, tp)
    return cls(**kwargs)


def fnv64(data: bytes) -> int:
    """FNV-1 64-bit (HarmonyLite hashes the machine id with it for its default node id)."""
    h = 0xCBF29CE484222325
    for byte in data:
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
        h ^= byte
    return h


def default_node_id() -> int:
    """HarmonyLite's default: FNV-1 64 of the machine id (dbus's file first, as it reads them),
    so a node taken over from HarmonyLite keeps its id; the host name when there is none."""
    for candidate in ("/var/lib/dbus/machine-id", "/etc/machine-id"):
        try:
            text = Path(candidate).read_text().strip()
        except OSError:
            continue
        if text:
            return fnv64(text.encode()) or 1
    import socket

    return fnv64(socket.gethostname().encode()) or 1


def parse_config(
    data: dict[str, Any],
    *,
    node_id: int | None = None,
    cluster: ClusterFlags | None = None,
) -> tuple[Config, list[str]]:
    """Build a Config from parsed TOML; returns it with the warnings to log."""
    warnings: list[str] = []
    cfg: Config = _build(Config, data, "", warnings)
    changes: dict[str, Any] = {}
    if node_id:  # -node-id 0 means "no override", as in HarmonyLite
        changes["node_id"] = _check_type("-node-id", node_id, int)
    elif cfg.node_id == 0:
        changes["node_id"] = default_node_id()
    if cluster is not None:
        changes["cluster"] = cluster
    if cfg.replicate_ddl and "exclude_tables" not in data:
        # The schema replicates, so the record of which migrations made it does too.
        changes["exclude_tables"] = []
    if not cfg.seq_map_path and cfg.db_path:
        changes["seq_map_path"] = str(Path(cfg.db_path).parent / "seq-map.cbor")
    if cfg.snapshot.enabled:
        _check_store(cfg.snapshot)
    _check_prefixes(cfg.nats)
    check_recipients(cfg.snapshot.encryption.recipients)
    if cfg.snapshot.encryption.identity_file:
        # Read at start, so that a node cannot run for hours before its first restore finds out.
        load_identities(cfg.snapshot.encryption.identity_file)
    return dataclasses.replace(cfg, **changes), warnings


def _check_prefixes(nats: NatsConfig) -> None:
    # The stream prefix names streams and (as the cluster's namespace) KV buckets, which allow
    # letters, digits, '-' and '_' only; the subject prefix is a NATS subject (no wildcards).
    if not NAME_PATTERN.match(nats.stream_prefix):
        raise ConfigError("nats.stream_prefix", nats.stream_prefix,
                          "must be letters, digits, '-' and '_' only (it names streams and "
                          "buckets)")
    subject = nats.subject_prefix
    if not subject or any(c in subject for c in " \t*>") or "" in subject.split("."):
        raise ConfigError("nats.subject_prefix", subject,
                          "must be a NATS subject: no spaces, '*' or '>', no empty '.' token")


def _check_store(snap: SnapshotConfig) -> None:
    required = {
        "s3": ("bucket", snap.s3.bucket),
        "sftp": ("url", snap.sftp.url),
        "webdav": ("url", snap.webdav.url),
        "file": ("path", snap.file.path),
    }
    if snap.store in required:
        name, value = required[snap.store]
        if not value:
            raise ConfigError(
                f"snapshot.{snap.store}.{name}", value, f"is required when snapshot.store = "
                f"{snap.store!r}"
            )
    if snap.store == "sftp" and not snap.sftp.url.startswith("sftp://"):
        raise ConfigError("snapshot.sftp.url", "<redacted>", "must look like sftp://user@host:port/path")
    if snap.store == "webdav" and not snap.webdav.url.startswith(("http://", "https://")):
        raise ConfigError("snapshot.webdav.url", "<redacted>", "must start with http:// or https://")


# ``${NAME}`` in a string value is replaced by the environment variable NAME when the file is
# loaded, so secrets (S3 keys, NATS passwords, SFTP/WebDAV URLs) need not be written in it.
# ``$${`` stands for a literal ``${``.
_ENV_REF = re.compile(r"\$(\$?)\{([^}]*)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def expand_env(data: Any, env: typing.Mapping[str, str], key: str = "") -> Any:
    """``data`` with every ``${NAME}`` in its strings replaced from ``env``; a reference to an
    unset variable (or a malformed one) is an error naming the key and the variable."""
    if isinstance(data, dict):
        return {k: expand_env(v, env, f"{key}.{k}" if key else k) for k, v in data.items()}
    if isinstance(data, list):
        return [expand_env(v, env, key) for v in data]
    if not isinstance(data, str) or "${" not in data:
        return data

    def one(m: re.Match[str]) -> str:
        if m[1]:  # $${...}: written literally
            return "${" + m[2] + "}"
        name = m[2]
        if not _ENV_NAME.match(name):
            raise ConfigError(key, m[0], "refers to an environment variable with an invalid "
                              "name (use ${NAME}: letters, digits and _; $${ for a literal ${)")
        if name not in env:
            raise ConfigError(key, m[0], f"refers to environment variable {name}, which is not "
                              "set")
        return env[name]

    return _ENV_REF.sub(one, data)


def with_join(cfg: Config, mode: str) -> Config:
    """``cfg`` with ``snapshot.join`` set from the command line (``-join MODE``)."""
    if mode not in JOIN_MODES:
        raise ConfigError("-join", mode, "must be one of " + ", ".join(JOIN_MODES))
    return dataclasses.replace(cfg, snapshot=dataclasses.replace(cfg.snapshot, join=mode))


def load_config(
    path: str | Path,
    *,
    node_id: int | None = None,
    cluster: ClusterFlags | None = None,
    required: bool = False,
) -> tuple[Config, list[str]]:
    """Read a TOML file; a missing file means every default unless ``required`` (a path the
    operator named explicitly), which is then an error saying so."""
    p = Path(path)
    if not p.exists():
        if required:
            raise ConfigError("-config", str(p), "the file does not exist")
        return parse_config({}, node_id=node_id, cluster=cluster)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("-config", str(p), f"must be valid TOML ({exc})") from exc
    data = expand_env(data, os.environ)
    return parse_config(data, node_id=node_id, cluster=cluster)

