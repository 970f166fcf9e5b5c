"""`harmonylite shared-settings show|apply [--json]`: the settings every node of the cluster must
share (see ``node.shared_settings``).

``show`` prints the cluster's record next to this configuration's values and the NATS names the
cluster uses; exit 0 when they agree, 1 when they differ or nothing is recorded yet. ``apply``
records this configuration's values as the cluster's: the way to change the shard count for a
whole cluster, while every node is stopped (refused, exit 2, while one runs, and for a value
that cannot change at all).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import TYPE_CHECKING, Any

from harmonylite.bus.names import namespace
from harmonylite.cli.parsing import Commands, add_command, add_verbs
from harmonylite.config import Config

if TYPE_CHECKING:
    from harmonylite.node import shared_settings as shared


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "shared-settings", summary="the settings every node must share, as "
                    "the cluster recorded them; apply changes the shard count for the whole "
                    "cluster",
                    description="Settings every node of the cluster must share.", handler=main)
    verbs = add_verbs(p)
    show = verbs.add_parser("show", help="the cluster's values next to this configuration's")
    show.add_argument("-json", "--json", action="store_true", help="print JSON")
    verbs.add_parser("apply", help="record this configuration's values as the cluster's")


async def _run(cfg: Config, verb: str) -> tuple[shared.Record | None, shared.Record | None]:
    from harmonylite.cli.connecting import default_js_context
    from harmonylite.node import settings_change
    from harmonylite.node import shared_settings as shared

    async with default_js_context(cfg) as js:
        if verb == "apply":
            return await settings_change.apply(js, cfg)
        return await shared.read(await shared.open_settings(js, cfg)), None


def _settings_text(settings: dict[str, object]) -> str:
    from harmonylite.node import shared_settings as shared

    return ", ".join(f"{k} = {shared.toml_text(v)}" for k, v in settings.items())


def main(cfg: Config, args: argparse.Namespace) -> int:
    # The shared settings live in NATS: the client library is imported when this command runs,
    # not by every command line the tree parses.
    from harmonylite.node import shared_settings as shared

    record, new = asyncio.run(_run(cfg, args.verb))
    if args.verb == "apply":
        assert new is not None
        if record is None:
            print(f"recorded the cluster's shared settings: {_settings_text(new.settings)}")
            return 0
        changed = [f"{k}: {shared.toml_text(record.settings.get(k))} -> "
                   f"{shared.toml_text(v)}" for k, v in new.settings.items()
                   if record.settings.get(k) != v]
        if not changed:
            print("the cluster's shared settings already are this configuration's")
            return 0
        print("changed " + "; ".join(changed))
        print("start every node with these values (a node started with the old ones is "
              "refused)")
        if new.cut != record.cut:
            print("each node reads the old streams up to "
                  + ", ".join(f"{s} {last}" for s, last in sorted(new.cut.items()))
                  + " before anything newer")
        if new.retired:
            print("nodes read the retired streams too, so nothing written there is lost: "
                  + ", ".join(sorted(new.retired)))
        return 0
    differences = record.differences(cfg) if record is not None else []
    if args.json:
        out: dict[str, Any] = {
            "cluster": record.settings if record else None,
            "recorded_by": record.node_id if record else None,
            "updated_at": record.updated_at if record else None,
            "retired_streams": record.retired if record else {},
            "cut": record.cut if record else {},
            "this_node": shared.own_settings(cfg),
            "differences": [d.key for d in differences],
            "names": namespace(cfg).describe(),
        }
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        if record is None:
            print("nothing recorded yet (the first node to start records its values)")
        else:
            print(f"cluster (recorded by node {record.node_id}): "
                  f"{_settings_text(record.settings)}")
            if record.retired:
                print("retired streams (still read): " + ", ".join(sorted(record.retired)))
        print(f"this configuration: {_settings_text(shared.own_settings(cfg))}")
        for d in differences:
            print(f"differs: {d}")
        for what, name in namespace(cfg).describe().items():
            if isinstance(name, dict):
                name = ", ".join(f"{stream} (subject {subj})" for stream, subj in name.items())
            print(f"{what}: {name}")
    return 0 if record is not None and not differences else 1
