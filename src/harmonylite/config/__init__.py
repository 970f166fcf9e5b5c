"""TOML configuration turned into frozen dataclasses.

The parts: the tables with their defaults (``tables``), the checks of a parsed document against
them (``checks``), ``${NAME}`` environment references (``env``) and reading a node's file
(``loading``). The names below are the ones the rest of harmonylite uses.
"""

from __future__ import annotations

from harmonylite.config.checks import CHOICES, INT_RANGES
from harmonylite.config.env import expand_env
from harmonylite.config.loading import (
    default_node_id,
    fnv64,
    load_config,
    parse_config,
    with_join,
)
from harmonylite.config.tables import (
    DEFAULT_EXCLUDED_TABLES,
    DEFAULT_STREAM_PREFIX,
    DEFAULT_SUBJECT_PREFIX,
    JOIN_MODES,
    LOG_FORMATS,
    NAME_PATTERN,
    STORES,
    ClusterFlags,
    Config,
    EncryptionConfig,
    FileStoreConfig,
    HealthCheckConfig,
    LoggingConfig,
    NatsConfig,
    NatsStoreConfig,
    PrometheusConfig,
    ReplicationLogConfig,
    S3Config,
    SftpConfig,
    SnapshotConfig,
    WebdavConfig,
)

__all__ = [
    "CHOICES", "DEFAULT_EXCLUDED_TABLES", "DEFAULT_STREAM_PREFIX", "DEFAULT_SUBJECT_PREFIX",
    "INT_RANGES", "JOIN_MODES", "LOG_FORMATS", "NAME_PATTERN", "STORES", "ClusterFlags", "Config",
    "EncryptionConfig", "FileStoreConfig", "HealthCheckConfig", "LoggingConfig", "NatsConfig",
    "NatsStoreConfig", "PrometheusConfig", "ReplicationLogConfig", "S3Config", "SftpConfig",
    "SnapshotConfig", "WebdavConfig", "default_node_id", "expand_env", "fnv64", "load_config",
    "parse_config", "with_join",
]
