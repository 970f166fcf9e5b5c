"""`harmonylite schema status [--cluster] [--json]`.

Also reached by HarmonyLite's flags `-schema-status` and `-schema-status-cluster`.

Without ``--cluster``: this node's tables with their schema hash and columns, and its parked
changes per table (read from the database; the node may be running). With ``--cluster``: every
node's view from the cluster's schema registry (KV bucket ``harmonylite-schema-registry`` by
default), side by side, tables whose shape differs between nodes marked with ``*``. Exit 0; 1
when the cluster view cannot be read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from harmonylite.bus.names import namespace
from harmonylite.cli.parsing import Commands, add_command, add_verbs, existing_database
from harmonylite.config import Config
from harmonylite.db.connection import open_connection

EXIT_OK = 0


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "schema", summary="this node's schema and parked changes, or every "
                    "node's (--cluster)",
                    description="Schema of this node, or of every node of the cluster.",
                    handler=main)
    verbs = add_verbs(p)
    st = verbs.add_parser("status", help="tables, schema hashes and parked changes")
    st.add_argument("-cluster", "--cluster", action="store_true",
                    help="every node side by side, from the schema registry")
    st.add_argument("-json", "--json", action="store_true", help="print JSON")


def _local(cfg: Config) -> dict[str, Any]:
    # The registry (and the change capture it reads) is imported by the commands that use it
    # only: every command line imports this module to build the parser.
    from harmonylite.replication import schema_registry

    existing_database(cfg.db_path)
    conn = open_connection(cfg.db_path)
    try:
        return schema_registry.local_view(conn, cfg.node_id)
    finally:
        conn.close()


def format_local(view: dict[str, Any]) -> str:
    lines = [f"node {view['node_id']}\tschema {_version(view)}"]
    parked: dict[str, int] = view.get("parked", {})
    for name, t in sorted(view["tables"].items()):
        lines.append(f"  {name}\t{t['hash']}\tparked {parked.get(name, 0)}\t"
                     f"({', '.join(t['columns'])})")
    for name in sorted(set(parked) - set(view["tables"])):
        lines.append(f"  {name}\t(missing here)\tparked {parked[name]}")
    return "\n".join(lines)


def _version(view: dict[str, Any]) -> str:
    """A node's schema version: its hash, and with replicated schema changes how many it
    applied (and the states of the others)."""
    schema = view.get("schema") or {}
    text = str(schema.get("hash", "?"))
    if "changes" in schema:
        text += f" ({schema['changes']} changes"
        text += "".join(f", {schema[k]} {k}" for k in ("pending", "sent", "lost", "refused",
                                                          "failed") if schema.get(k))
        text += ")"
    return text


def format_cluster(views: dict[str, dict[str, Any]]) -> str:
    from harmonylite.replication import schema_registry

    nodes = sorted(views)
    differs = schema_registry.mismatches(views)
    tables = sorted({t for v in views.values() for t in v.get("tables", {})}
                    | {t for v in views.values() for t in v.get("parked", {})})
    hashes = {(views[n].get("schema") or {}).get("hash") for n in nodes}
    lines = [("* " if len(hashes) > 1 else "  ") + "schema\t"
             + "\t".join(_version(views[n]) for n in nodes)]
    lines.append("table\t" + "\t".join(nodes))
    for name in tables:
        cells = []
        for node in nodes:
            t = views[node].get("tables", {}).get(name)
            parked = views[node].get("parked", {}).get(name, 0)
            cell = t["hash"] if t else "(missing)"
            cells.append(cell + (f" parked {parked}" if parked else ""))
        lines.append(("* " if name in differs else "  ") + name + "\t" + "\t".join(cells))
    if differs:
        lines.append(f"* {len(differs)} tables differ between nodes")
    return "\n".join(lines)


async def _cluster(cfg: Config) -> dict[str, dict[str, Any]]:
    from harmonylite.cli.connecting import default_js_context
    from harmonylite.replication import schema_registry

    async with default_js_context(cfg) as js:
        return await schema_registry.cluster_views(js, namespace(cfg).schema_bucket)


def main(cfg: Config, args: argparse.Namespace) -> int:
    from harmonylite.replication import schema_registry

    if args.cluster:
        views = asyncio.run(_cluster(cfg))
        if args.json:
            print(json.dumps({"nodes": views, "mismatched": schema_registry.mismatches(views)},
                             indent=2, sort_keys=True))
        else:
            print(format_cluster(views) if views else "no node has published its schema yet")
        return EXIT_OK
    view = _local(cfg)
    print(json.dumps(view, indent=2, sort_keys=True) if args.json else format_local(view))
    if not args.json and view.get("parked"):
        print(f"{sum(view['parked'].values())} changes parked", file=sys.stderr)
    return EXIT_OK
