"""Checking a parsed TOML document against the configuration's tables.

Every error names the dotted key, the value found and what is allowed; unknown keys are returned as
warnings so that the caller can log them once logging is set up.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from harmonylite.config.tables import (
    JOIN_MODES,
    LOG_FORMATS,
    NAME_PATTERN,
    STORES,
    NatsConfig,
    SnapshotConfig,
)
from harmonylite.errors import ConfigError

# Allowed ranges for integer keys: dotted key -> (minimum, maximum or None).
INT_RANGES: dict[str, tuple[int, int | None]] = {
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

CHOICES: dict[str, tuple[str, ...]] = {
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


def check_type(key: str, value: Any, tp: Any) -> Any:
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
    if key.lstrip("-").replace("-", "_") in INT_RANGES:
        lo, hi = INT_RANGES[key.lstrip("-").replace("-", "_")]
        if value < lo or (hi is not None and value > hi):
            allowed = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigError(key, value, f"must be an integer {allowed}")
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(key, value, "must be one of " + ", ".join(CHOICES[key]))
    return value


def build(cls: type[Any], data: dict[str, Any], prefix: str, warnings: list[str]) -> Any:
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
            kwargs[name] = build(tp, value, key + ".", warnings)
        else:
            kwargs[name] = check_type(key, value, tp)
    return cls(**kwargs)


def check_prefixes(nats: NatsConfig) -> None:
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


def check_store(snap: SnapshotConfig) -> None:
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
