"""`harmonylite conflicts list [--json]`: rows this node removed because a change later in the
stream's order took a UNIQUE value they held (see ``replication.conflicts``), and schema changes
that lost to another node's change of the same objects (``replicate_ddl``; see
``replication.schema_apply``)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from harmonylite.cli.parsing import Commands, add_command, add_verbs, existing_database
from harmonylite.config import Config
from harmonylite.db.connection import open_connection


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "conflicts", summary="rows this node removed because a later "
                    "change took their UNIQUE value",
                    description="Rows displaced by UNIQUE conflicts on this node.", handler=main)
    verbs = add_verbs(p)
    ls = verbs.add_parser("list", help="table, key, displaced values, winning origin, stream, "
                                       "sequence")
    ls.add_argument("-json", "--json", action="store_true", help="print a JSON array")


def main(cfg: Config, args: argparse.Namespace) -> int:
    # Imported here, not at the top: every command line imports every command's module to
    # build the parser, and a restore should not pay for what it does not run.
    from harmonylite.cdc import schema_changes
    from harmonylite.replication import conflicts

    existing_database(cfg.db_path)
    conn = open_connection(cfg.db_path)
    try:
        found = conflicts.rows(conn)
        lost = schema_changes.rows(conn, "lost")
    finally:
        conn.close()
    if args.json:
        print(json.dumps([c.as_json() for c in found]
                         + [{"kind": "schema_change", **c.as_json()} for c in lost], indent=2))
        return 0
    for ch in lost:
        when = datetime.fromtimestamp(ch.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"schema change {ch.uid} of node {ch.origin}\t{', '.join(sorted(ch.objects))}\t"
              f"{ch.reason}\t{json.dumps(ch.stmts)}\t{when}")
    for c in found:
        when = datetime.fromtimestamp(c.created_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        print(f"{c.id}\t{c.table}\t{c.key}\t{json.dumps(c.displaced)}\twon by node "
              f"{c.winner_origin} key {c.winner_key}\t{c.stream} {c.seq}\t{when}")
    print(f"{len(found)} displaced rows" + (f", {len(lost)} schema changes lost"
                                             if lost else ""), file=sys.stderr)
    return 0
