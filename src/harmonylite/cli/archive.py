"""`harmonylite archive verify`: is the archive of the change streams continuous and sound?

Exit 0 when every stream's archive runs without a hole from the oldest kept snapshot to its
head and every segment on the way checks out; 1 naming each gap or corrupt segment otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from harmonylite.bus.names import namespace
from harmonylite.cli.parsing import Commands, add_command, add_verbs
from harmonylite.config import Config


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "archive", summary="the archive of the change streams "
                    "(snapshot.archive): verify it is continuous",
                    description="The archive of the change streams (snapshot.archive).",
                    handler=main)
    verbs = add_verbs(p)
    ver = verbs.add_parser("verify", help="check the archive is continuous from the oldest kept "
                           "snapshot to its head on every stream, every segment sound; exit 1 "
                           "naming a gap or a corrupt segment")
    ver.add_argument("-quick", "--quick", action="store_true",
                     help="check continuity from the listing only, without downloading segments")


async def _run(cfg: Config, quick: bool) -> int:
    from harmonylite.archive.verify import verify
    from harmonylite.cli.snapshot import snapshot_store

    async with snapshot_store(cfg) as store:
        report = await verify(store, namespace(cfg).streams(), deep=not quick)
    for line in report.lines:
        print(line)
    for problem in report.problems:
        print(f"harmonylite: {problem}", file=sys.stderr)
    if report.ok:
        print(f"archive ok: {report.segments} segments", file=sys.stderr)
        return 0
    return 1


def main(cfg: Config, args: argparse.Namespace) -> int:
    return asyncio.run(_run(cfg, args.quick))
