"""The configuration of a node: its file read, checked and completed (node id, derived paths)."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any

from harmonylite.age_keys import check_recipients, load_identities
from harmonylite.config.checks import build, check_prefixes, check_store, check_type
from harmonylite.config.env import expand_env
from harmonylite.config.tables import JOIN_MODES, ClusterFlags, Config
from harmonylite.errors import ConfigError


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
    cfg: Config = build(Config, data, "", warnings)
    changes: dict[str, Any] = {}
    if node_id:  # -node-id 0 means "no override", as in HarmonyLite
        changes["node_id"] = check_type("-node-id", node_id, int)
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
        check_store(cfg.snapshot)
    check_prefixes(cfg.nats)
    check_recipients(cfg.snapshot.encryption.recipients)
    if cfg.snapshot.encryption.identity_file:
        # Read at start, so that a node cannot run for hours before its first restore finds out.
        load_identities(cfg.snapshot.encryption.identity_file)
    return dataclasses.replace(cfg, **changes), warnings


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
