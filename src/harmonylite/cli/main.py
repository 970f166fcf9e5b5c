"""The `harmonylite` command: global flags (one or two dashes), then an optional verb."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sqlite3
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harmonylite import __version__
from harmonylite.cli.parsing import existing_database, parser_class
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
EXIT_CODES = (
    (EXIT_OK, "success"),
    (EXIT_FAILURE, "failure at run time (the message says what failed; a snapshot verification "
                   "names its check)"),
    (EXIT_USAGE, "bad configuration or usage (the message names the key or flag, the value and "
                 "what is allowed)"),
    (EXIT_BUSY, "a snapshot is already being captured (`system busy capturing snapshot`)"),
)


@dataclass(frozen=True)
class Command:
    """A verb after the global flags: ``module`` has ``build_parser()`` and ``main(cfg, argv)``."""

    name: str
    module: str
    summary: str

    def load(self) -> Any:
        return importlib.import_module(self.module)


# The one list of commands: dispatch, --help and docs/cli.md all read it.
COMMANDS = (
    Command("snapshot", "harmonylite.cli.snapshot", "take, list, verify and restore snapshots"),
    Command("archive", "harmonylite.cli.archive",
            "the archive of the change streams (snapshot.archive): verify it is continuous"),
    Command("dead-letters", "harmonylite.cli.dead_letters",
            "changes this node could not apply: list, show, retry, drop"),
    Command("schema", "harmonylite.cli.schema",
            "this node's schema and parked changes, or every node's (--cluster)"),
    Command("conflicts", "harmonylite.cli.conflicts",
            "rows this node removed because a later change took their UNIQUE value"),
    Command("cluster", "harmonylite.cli.cluster",
            "every node of the cluster from its heartbeats: status (worst first), forget"),
    Command("shared-settings", "harmonylite.cli.shared_settings",
            "the settings every node must share, as the cluster recorded them; apply changes "
            "the shard count for the whole cluster"),
)


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """The verbs of a command's parser with their help (``snapshot`` -> save, list, ...)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            return [(name, sub, helps.get(name, "")) for name, sub in action.choices.items()]
    return []


def option_name(action: argparse.Action) -> str:
    """The two-dash spelling (every flag also takes one dash)."""
    return next((o for o in action.option_strings if o.startswith("--")), action.option_strings[0])


def synopsis(prog: str, parser: argparse.ArgumentParser) -> str:
    """``harmonylite snapshot restore [ID|latest] [--output PATH] [--force]``, help left out."""
    parts = [prog]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:
            name = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
            parts.append(f"[{name}]" if action.nargs == "?" else name)
            continue
        flag = option_name(action)
        if action.nargs != 0:
            metavar = action.metavar if isinstance(action.metavar, str) else action.dest.upper()
            flag += f" {metavar}"
        parts.append(flag if action.required else f"[{flag}]")
    return " ".join(parts)


def _commands_epilog() -> str:
    lines = ["commands (after the flags: harmonylite -config PATH COMMAND ...):"]
    for command in COMMANDS:
        for name, sub, text in subcommands(command.load().build_parser()):
            lines.append(f"  {synopsis(f'{command.name} {name}', sub)}")
            lines.append(f"      {text}")
    lines += ["  (no command)", "      run a node", "", "exit codes:"]
    lines += [f"  {code:<3} {text}" for code, text in EXIT_CODES]
    lines += ["", "Flags take one or two dashes. `harmonylite COMMAND --help` describes a command."]
    return "\n".join(lines)


_Parser = parser_class("")


class _MainParser(_Parser):  # type: ignore[valid-type,misc]
    """The list of commands is written when help is shown: building it loads every command's
    module, which a command that only needs its own (a restore from S3) should not pay for."""

    def format_help(self) -> str:
        self.epilog = _commands_epilog()
        text: str = super().format_help()
        return text


def build_parser() -> argparse.ArgumentParser:
    p = _MainParser(prog="harmonylite", description="Leaderless SQLite replication over NATS "
                    "JetStream, with verified snapshots.", allow_abbrev=False,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-config", "--config", default=None, metavar="PATH",
                   help="TOML configuration; a file named here must exist (without -config: "
                   "config.toml when present, else all defaults)")
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
    p.add_argument("verb", nargs=argparse.REMAINDER, metavar="COMMAND ...",
                   help="one of: " + ", ".join(c.name for c in COMMANDS) + " (below)")
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

    existing_database(cfg.db_path)
    conn = open_connection(cfg.db_path)
    try:
        # HarmonyLite's layout too; its unpublished changes are named in the log as they go.
        dropped = len(take_over(conn, keep_pending=False).dropped)
        dropped += remove_all(conn)
    finally:
        conn.close()
    log.info("removed %d harmonylite objects from %s", dropped, cfg.db_path)
    return EXIT_OK


def _command(name: str) -> Command:
    for command in COMMANDS:
        if command.name == name:
            return command
    raise UsageError(f"unknown command {name!r}: the commands are "
                     + ", ".join(repr(c.name) for c in COMMANDS))


def run(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    if args.version:
        print(f"harmonylite {__version__}")
        return EXIT_OK
    if args.verb:
        command = _command(args.verb[0])
        if {"-h", "--help"} & set(args.verb[1:]):
            # A command's help needs no configuration: its parser prints it and exits 0.
            try:
                command.load().build_parser().parse_args(args.verb[1:])
            except SystemExit as exc:
                return int(exc.code or 0)
    cfg = _load(args)
    if args.cleanup:
        return _cleanup(cfg)
    verb: list[str] = list(args.verb)
    if args.save_snapshot:
        verb = ["snapshot", "save"]
    if args.schema_status or args.schema_status_cluster:
        verb = ["schema", "status", *(["--cluster"] if args.schema_status_cluster else [])]
    if verb:
        command = _command(verb[0])
        code: int = command.load().main(cfg, verb[1:])
        return code
    from harmonylite.node.run import run_node

    return asyncio.run(run_node(cfg))


def _safe(exc: BaseException) -> str:
    """The error's text without credentials (a NATS URL may carry a password or token)."""
    from harmonylite.redact import redact

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
