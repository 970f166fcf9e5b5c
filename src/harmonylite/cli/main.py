"""The `harmonylite` command: one argument tree, global flags (one or two dashes) at its root,
then an optional command with its verb, each command's part of the tree from its own module."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sqlite3
import sys
from collections.abc import Generator, Sequence
from typing import Any

from harmonylite import __version__
from harmonylite.cli import (
    archive,
    cluster,
    conflicts,
    dead_letters,
    schema,
    shared_settings,
    snapshot,
)
from harmonylite.cli.parsing import CommandParser, existing_database, parse
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


# The commands, in the order --help and docs/cli.md list them; each module adds its part of the
# tree (``add_parser``) with its handler (``main``).
COMMANDS = (snapshot, archive, dead_letters, schema, conflicts, cluster, shared_settings)


def subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser, str]]:
    """A parser's subcommands with their help: the commands of the top-level parser, the verbs
    of a command's (``snapshot`` -> save, list, ...)."""
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


def _commands_epilog(parser: argparse.ArgumentParser) -> str:
    lines = ["commands (after the flags: harmonylite -config PATH COMMAND ...):"]
    for command, command_parser, _ in subcommands(parser):
        for name, sub, text in subcommands(command_parser):
            lines.append(f"  {synopsis(f'{command} {name}', sub)}")
            lines.append(f"      {text}")
    lines += ["  (no command)", "      run a node", "", "exit codes:"]
    lines += [f"  {code:<3} {text}" for code, text in EXIT_CODES]
    lines += ["", "Flags take one or two dashes. `harmonylite COMMAND --help` describes a command."]
    return "\n".join(lines)


class _TopHelp(argparse.RawDescriptionHelpFormatter):
    """The top-level help as it always read: the commands are listed in the epilog with their
    verbs, not under COMMAND, and the usage ends with ``...``."""

    def _iter_indented_subactions(self, action: argparse.Action
                                  ) -> Generator[argparse.Action, None, None]:
        if not isinstance(action, argparse._SubParsersAction):
            yield from super()._iter_indented_subactions(action)

    def _format_args(self, action: argparse.Action, default_metavar: str) -> str:
        if action.nargs == argparse.PARSER:
            return "..."
        return super()._format_args(action, default_metavar)


class _TopParser(CommandParser):
    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # An unknown command is named as such, with the list of commands.
        if isinstance(action, argparse._SubParsersAction) and value not in action.choices:
            raise UsageError(f"unknown command {value!r}: the commands are "
                             + ", ".join(repr(c) for c in action.choices))
        super()._check_value(action, value)


def build_parser() -> CommandParser:
    p = _TopParser(prog="harmonylite", description="Leaderless SQLite replication over NATS "
                   "JetStream, with verified snapshots.", allow_abbrev=False,
                   formatter_class=_TopHelp)
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
    commands = p.add_subparsers(dest="command", metavar="COMMAND ...", parser_class=CommandParser)
    for command in COMMANDS:
        command.add_parser(commands)
    commands.help = "one of: " + ", ".join(commands.choices) + " (below)"
    p.epilog = _commands_epilog(p)
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


def run(argv: Sequence[str]) -> int:
    parser = build_parser()
    # A command's --help is printed here, before any configuration is read, and exits 0.
    args = parse(parser, argv)
    if args.version:
        print(f"harmonylite {__version__}")
        return EXIT_OK
    cfg = _load(args)
    if args.cleanup:
        return _cleanup(cfg)
    if args.save_snapshot:
        args = parse(parser, ["snapshot", "save"])
    if args.schema_status or args.schema_status_cluster:
        args = parse(parser, ["schema", "status",
                              *(["--cluster"] if args.schema_status_cluster else [])])
    if args.command is not None:
        code: int = args.handler(cfg, args)
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
