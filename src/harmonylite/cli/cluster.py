"""`harmonylite cluster status [--json] [--watch]` and `harmonylite cluster forget N`.

``status`` reads every node's heartbeat from the cluster's heartbeat and last-seen buckets (the
same records the live page at ``GET /`` shows) and prints one row per node, worst first. It needs
only NATS: any node's configuration works, a stopped node's included. Exit 0 when every node is
healthy; 1 when any is down, unhealthy (its own health, more than ``--max-lag`` messages behind,
or a table whose schema differs from most nodes'), or no node has put a heartbeat.

``forget`` removes a node that left the cluster for good from the view (a node still beating
comes back at its next heartbeat, so it is refused unless ``--force``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any, TextIO

from harmonylite.bus.names import namespace
from harmonylite.cli.parsing import Commands, add_command, add_verbs
from harmonylite.cluster import view
from harmonylite.config import Config
from harmonylite.errors import HarmonyliteError

EXIT_OK, EXIT_FAILURE = 0, 1
WATCH_SECONDS = 2.0


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "cluster", summary="every node of the cluster from its heartbeats: "
                    "status (worst first), forget",
                    description="Every node of the cluster, from the heartbeats they put in NATS.",
                    handler=main)
    verbs = add_verbs(p)
    st = verbs.add_parser("status", help="one row per node, worst first; exit 1 unless every "
                          "node is healthy")
    st.add_argument("-json", "--json", action="store_true",
                    help='print {"nodes": [{"node_id": N, "state": "healthy" | "unhealthy" | '
                    '"down", ...}]}')
    st.add_argument("-watch", "--watch", action="store_true",
                    help=f"print again every {WATCH_SECONDS:.0f} s until interrupted")
    st.add_argument("-max-lag", "--max-lag", type=int, default=view.DEFAULT_MAX_LAG,
                    metavar="N", help="messages behind a stream's head before a node counts as "
                    f"unhealthy (default {view.DEFAULT_MAX_LAG})")
    fg = verbs.add_parser("forget", help="drop a node that left the cluster for good from the "
                          "view")
    fg.add_argument("node_id", type=int, metavar="N", help="the node's id")
    fg.add_argument("-force", "--force", action="store_true",
                    help="even when the node still puts heartbeats (it reappears at its next)")


def _render(doc: dict[str, Any], as_json: bool) -> str:
    if as_json:
        return json.dumps(doc, indent=2, sort_keys=True)
    leader = doc["leader"]
    summary = (f"{sum(v['state'] == 'healthy' for v in doc['nodes'])} of {len(doc['nodes'])} "
               f"nodes healthy; snapshot leader: {'none' if leader is None else leader}")
    return view.format_table(doc) + "\n" + summary


async def _status(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    from harmonylite.cli.connecting import default_js_context
    from harmonylite.cluster.read import read_records

    names = namespace(cfg)
    async with default_js_context(cfg) as js:
        while True:
            records = await read_records(js, names.heartbeat_bucket, names.last_seen_bucket)
            doc = view.build(records, max_lag=args.max_lag)
            code = EXIT_OK if doc["healthy"] else EXIT_FAILURE
            if args.watch and not args.json and out.isatty():
                out.write("\x1b[H\x1b[2J")  # from the top of a cleared screen
            out.write(_render(doc, args.json) + "\n")
            out.flush()
            if not args.watch:
                return code
            await asyncio.sleep(WATCH_SECONDS)


async def _forget(cfg: Config, args: argparse.Namespace, out: TextIO) -> int:
    from harmonylite.cli.connecting import default_js_context
    from harmonylite.cluster.read import forget, read_records

    names = namespace(cfg)
    async with default_js_context(cfg) as js:
        if not args.force:
            doc = view.build(await read_records(js, names.heartbeat_bucket,
                                                names.last_seen_bucket))
            live = [v for v in doc["nodes"]
                    if v["node_id"] == args.node_id and v["state"] != "down"]
            if live:
                raise HarmonyliteError(f"node {args.node_id} is still putting heartbeats "
                                       "(stop it first, or --force)")
        found = await forget(js, (names.heartbeat_bucket, names.last_seen_bucket), args.node_id)
    if not found:
        raise HarmonyliteError(f"node {args.node_id} is not in the cluster view")
    out.write(f"node {args.node_id} forgotten\n")
    return EXIT_OK


def main(cfg: Config, args: argparse.Namespace) -> int:
    run = _status if args.verb == "status" else _forget
    return asyncio.run(run(cfg, args, sys.stdout))
