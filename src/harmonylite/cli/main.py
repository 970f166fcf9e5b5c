"""The `harmonylite` command: global flags (one or two dashes), then an optional verb."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path

from harmonylite import __version__
from harmonylite.config import JOIN_MODES, ClusterFlags, Config, load_config, with_join
from harmonylite.errors import (
    ConfigError,
    HarmonyliteError,
    JoinRefused,
    SnapshotBusy,
    UsageError,
)
from harmonylite.ops.logs import setup_logging

log = logging.getLogger("harmonylite")

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 75


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="harmonylite", description="Leaderless SQLite replication over NATS "
                "JetStream, with verified snapshots.", allow_abbrev=False)
    p.add_argument("-config", "--config", default=None, metavar="PATH",
                   help="TOML configuration (default config.toml, where a missing file means "
                   "all defaults; a file named here must exist)")
    p.add_argument("-node-id", "--node-id", type=int, default=None, metavar="N",
                   help="override node_id (0: no override, as in HarmonyLite)")
    p.add_argument("-cleanup", "--cleanup", action="store_true",
                   help="remove every harmonylite trigger and table from the database, then exit")
    p.add_argument("-save-snapshot", "--save-snapshot", action="store_true",
                   help="take one snapshot now, print its id, exit")
    p.add_argument("-cluster-addr", "--cluster-addr", default="", metavar="ADDR",
                   help="cluster listen address of the embedded NATS server")
    p.add_argument("-cluster-peers", "--cluster-peers", default="", metavar="LIST",
                   help="comma-separated cluster addresses of the other embedded servers")
    p.add_argument("-leaf-servers", "--leaf-servers", default="", metavar="LIST",
                   help="comma-separated leaf node remotes for the embedded NATS server")
    p.add_argument("-join", "--join", default=None, metavar="MODE",
                   help="what a node whose database has rows of its own (and no stream "
                   "positions) does when the cluster has a snapshot: "
                   + " | ".join(JOIN_MODES) + " (overrides snapshot.join)")
    p.add_argument("-schema-status", "--schema-status", action="store_true",
                   help="same as the verb 'schema status'")
    p.add_argument("-schema-status-cluster", "--schema-status-cluster", action="store_true",
                   help="same as the verb 'schema status --cluster'")
    p.add_argument("-pprof", "--pprof", default="", metavar="ADDR",
                   help="accepted for HarmonyLite compatibility: Go's pprof server has no "
                   "equivalent here (a warning says so; profile with py-spy instead)")
    p.add_argument("-version", "--version", action="store_true", help="print the version")
    p.add_argument("verb", nargs=argparse.REMAINDER,
                   help="snapshot list|save|verify|restore, dead-letters list|show|retry|drop")
    return p


def _split(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _load(args: argparse.Namespace) -> Config:
    cluster = ClusterFlags(args.cluster_addr, _split(args.cluster_peers), _split(args.leaf_servers))
    cfg, warnings = load_config(args.config or "config.toml", node_id=args.node_id,
                                cluster=cluster, required=args.config is not None)
    if args.join is not None:
        cfg = with_join(cfg, args.join)
    setup_logging(cfg.node_id, cfg.logging.format, cfg.logging.verbose)
    for w in warnings:
        log.warning(w)
    if args.pprof:
        log.warning("-pprof %s ignored: Go's pprof server has no Python equivalent here; "
                    "profile a running node with py-spy (py-spy top --pid PID)", args.pprof)
    return cfg


def _cleanup(cfg: Config) -> int:
    from harmonylite.cdc.install import remove_all
    from harmonylite.cdc.takeover import take_over
    from harmonylite.db.connection import open_connection

    if not cfg.db_path or not Path(cfg.db_path).exists():
        raise HarmonyliteError(f"database file {cfg.db_path or '(db_path not set)'} does not exist")
    conn = open_connection(cfg.db_path)
    try:
        # HarmonyLite's layout too; its unpublished changes are named in the log as they go.
        dropped = len(take_over(conn, keep_pending=False).dropped)
        dropped += remove_all(conn)
    finally:
        conn.close()
    log.info("removed %d harmonylite objects from %s", dropped, cfg.db_path)
    return EXIT_OK


def _schema(cfg: Config, argv: list[str]) -> int:
    try:
        from harmonylite.cli import schema  # type: ignore[attr-defined, unused-ignore]
    except ImportError as exc:
        if exc.name != "harmonylite.cli.schema":
            raise
        print("harmonylite: schema status is not available in this version of harmonylite",
              file=sys.stderr)
        return EXIT_FAILURE
    code: int = schema.main(cfg, argv)
    return code


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.version:
        print(f"harmonylite {__version__}")
        return EXIT_OK
    cfg = _load(args)
    if args.cleanup:
        return _cleanup(cfg)
    verb: list[str] = list(args.verb)
    if args.save_snapshot:
        verb = ["snapshot", "save"]
    if args.schema_status or args.schema_status_cluster:
        verb = ["schema", "status", *(["--cluster"] if args.schema_status_cluster else [])]
    if verb:
        if verb[0] == "dead-letters":
            from harmonylite.cli import dead_letters

            return dead_letters.main(cfg, verb[1:])
        if verb[0] == "schema":
            return _schema(cfg, verb[1:])
        if verb[0] == "conflicts":
            from harmonylite.cli import conflicts

            return conflicts.main(cfg, verb[1:])
        if verb[0] != "snapshot":
            raise UsageError(f"unknown command {verb[0]!r}: the verbs are 'snapshot', "
                             "'dead-letters', 'schema' and 'conflicts'")
        from harmonylite.cli import snapshot

        return snapshot.main(cfg, verb[1:])
    from harmonylite.node.daemon import run_node

    return asyncio.run(run_node(cfg))


def _safe(exc: BaseException) -> str:
    """The error's text without credentials (a NATS URL may carry a password or token)."""
    from harmonylite.snapshot.storage import redact

    return redact(str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except (ConfigError, UsageError) as exc:
        print(f"harmonylite: {_safe(exc)}", file=sys.stderr)
        code = EXIT_USAGE
    except JoinRefused as exc:
        # The operator must choose (config or command line): a usage matter, not a failure
        # that a restart could cure.
        log.error("%s", exc)
        print(f"harmonylite: {_safe(exc)}", file=sys.stderr)
        code = EXIT_USAGE
    except SnapshotBusy as exc:
        print(f"harmonylite: {_safe(exc)}", file=sys.stderr)
        code = EXIT_BUSY
    except (HarmonyliteError, sqlite3.Error, OSError) as exc:
        log.error("%s", exc)
        print(f"harmonylite: {_safe(exc)}", file=sys.stderr)
        code = EXIT_FAILURE
    except KeyboardInterrupt:
        code = EXIT_OK
    if argv is None:
        sys.exit(code)
    return code
