"""`harmonylite dead-letters VERB`: the changes this node could not apply.

``list [--json]`` and ``show ID`` read ``__harmonylite__dead_letter``; ``retry ID|--all`` applies
the kept change again with the ordinary applier (the row goes away when it applies, and stays
with the new error when it does not); ``drop ID|--all`` deletes rows once an operator decided the
change is not wanted. The node may be running: every write takes SQLite's write lock.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from harmonylite.cli.parsing import Commands, add_command, add_verbs, existing_database
from harmonylite.config import Config
from harmonylite.db.connection import open_connection, write_transaction
from harmonylite.errors import HarmonyliteError, UsageError

if TYPE_CHECKING:
    from harmonylite.replication import deadletter

EXIT_OK, EXIT_FAILURE = 0, 1


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "dead-letters", summary="changes this node could not apply: list, "
                    "show, retry, drop",
                    description="Changes that could not be applied on this node.", handler=main)
    verbs = add_verbs(p)
    ls = verbs.add_parser("list", help="stream, sequence, origin, table, key and error of each")
    ls.add_argument("-json", "--json", action="store_true", help="print a JSON array")
    show = verbs.add_parser("show", help="one dead letter, with the change it holds")
    show.add_argument("id", type=int, help="its id, from list")
    for name, what in (("retry", "apply again"), ("drop", "delete")):
        v = verbs.add_parser(name, help=f"{what} one dead letter, or all of them")
        v.add_argument("id", type=int, nargs="?", help="its id, from list")
        v.add_argument("-all", "--all", action="store_true", help="every dead letter")


def _open(cfg: Config) -> sqlite3.Connection:
    existing_database(cfg.db_path)
    return open_connection(cfg.db_path)


def _shown(value: object) -> str:
    """A field the message did not carry is shown as ``-`` (``null`` in --json)."""
    return "-" if value is None else str(value)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _targets(conn: sqlite3.Connection, args: argparse.Namespace) -> list[deadletter.DeadLetter]:
    from harmonylite.replication import deadletter

    if args.all == (args.id is not None):
        raise UsageError(f"dead-letters {args.verb}: give one ID or --all")
    found = deadletter.rows(conn, None if args.all else args.id)
    if not found and not args.all:
        raise HarmonyliteError(f"no dead letter with id {args.id}")
    return found


def main(cfg: Config, args: argparse.Namespace) -> int:
    # Imported here, not at the top: every command line imports every command's module to
    # build the parser, and other commands should not pay for the applier.
    from harmonylite.replication import deadletter

    conn = _open(cfg)
    try:
        if args.verb == "list":
            found = deadletter.rows(conn)
            if args.json:
                print(json.dumps([d.as_json() for d in found], indent=2))
            else:
                for d in found:
                    print(f"{d.id}\t{d.stream}\t{d.seq}\tnode {_shown(d.origin)}\t"
                          f"{_shown(d.table)}\t{_shown(d.key)}\t"
                          f"{_when(d.created_at)}\t{d.error}")
                print(f"{len(found)} dead letters", file=sys.stderr)
            return EXIT_OK
        if args.verb == "show":
            (d,) = _targets(conn, argparse.Namespace(all=False, id=args.id, verb="show"))
            print(json.dumps(d.as_json(payload=True), indent=2))
            return EXIT_OK
        targets = _targets(conn, args)
        if args.verb == "drop":
            with write_transaction(conn):
                for d in targets:
                    deadletter.delete(conn, d.id)
            print(f"dropped {len(targets)} dead letters", file=sys.stderr)
            return EXIT_OK
        return _retry(conn, targets)
    finally:
        conn.close()


def _retry(conn: sqlite3.Connection, targets: list[deadletter.DeadLetter]) -> int:
    from harmonylite.replication import deadletter
    from harmonylite.replication.apply import Applier

    applier = Applier(skip_pending=False)
    failed = 0
    for d in targets:
        # The applier records a change that fails again as a new dead letter; the old row goes
        # either way, so each change is kept once, with its newest error.
        result = applier.apply(conn, d.stream, [(d.seq, d.payload)], replay=True)
        with write_transaction(conn):
            deadletter.delete(conn, d.id)
        if result.dead_letters:
            failed += 1
            print(f"dead letter {d.id} failed again (kept with its new error)", file=sys.stderr)
        else:
            print(f"dead letter {d.id} applied", file=sys.stderr)
    return EXIT_FAILURE if failed else EXIT_OK
