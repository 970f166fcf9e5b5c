"""`snapshot restore --to-time T | --to-sequence STREAM:SEQ`, and the restorable window that
`snapshot list` shows (docs/point-in-time.md)."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.errors import ConfigError, UsageError
from harmonylite.restore.verify import work_dir
from harmonylite.snapshot.manifest import Manifest
from harmonylite.snapshot.progress import Progress, ProgressSink
from harmonylite.storage.base import ObjectStore

if TYPE_CHECKING:
    # The rollback reads the streams over NATS: its client library is imported only when a
    # rollback runs, not by every command line the parser reads. The archive's modules, too,
    # are imported only when a point in time is asked for: a plain restore does not pay for them.
    from harmonylite.restore import point_in_time as pitr
    from harmonylite.restore import rollback


def add_arguments(res: argparse.ArgumentParser) -> None:
    point = res.add_mutually_exclusive_group()
    point.add_argument("-to-time", "--to-time", default=None, metavar="RFC3339",
                       help="restore the database as the cluster had it at this time (needs "
                       "snapshot.archive): the newest snapshot before it plus the archived "
                       "changes up to it; to --output, or in place on this stopped node with "
                       "its positions at the streams' heads (a rollback)")
    point.add_argument("-to-sequence", "--to-sequence", default=None, metavar="STREAM:SEQ",
                       help="the same, up to this message of a stream")


def target_of(args: argparse.Namespace) -> pitr.Target | None:
    if args.to_time is None and args.to_sequence is None:
        return None
    from harmonylite.restore import point_in_time as pitr

    if args.id not in ("", "latest"):
        raise UsageError("snapshot restore: name a snapshot id or a point (--to-time, "
                         "--to-sequence), not both: the point chooses the snapshot")
    return pitr.parse_time(args.to_time) if args.to_time is not None \
        else pitr.parse_sequence(args.to_sequence)


async def restore(cfg: Config, store: ObjectStore, target: pitr.Target, output: Path,
                  progress: ProgressSink, out: TextIO) -> pitr.Outcome:
    """Restore to ``output``; prints the snapshot used and how many changes were applied."""
    from harmonylite.archive.segment import us_to_rfc3339
    from harmonylite.restore import point_in_time as pitr

    if await asyncio.to_thread(output.exists):
        raise UsageError(f"--output {output} already exists: remove it or choose another")
    if not await asyncio.to_thread(output.parent.is_dir):
        raise UsageError(f"--output: directory {output.parent} does not exist")
    work = work_dir(cfg.snapshot.temp_dir or None)
    try:
        partial = work / "result.db"
        result = await pitr.restore(store, namespace(cfg).streams(), target, partial, work=work,
                                    replicated=cfg.replicates_table,
                                    replicate_ddl=cfg.replicate_ddl, progress=progress)
        staged = output.with_name(f".{output.name}.partial-{os.getpid()}")
        await asyncio.to_thread(shutil.move, partial, staged)
        os.replace(staged, output)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    cuts = ",".join(f"{s}={q}" for s, q in sorted(result.cuts.items()))
    out.write(f"{output}\n")
    progress.finish(
        f"restored to {us_to_rfc3339(result.t_us)} from snapshot {result.snapshot_id} plus "
        f"{result.messages} archived messages ({result.rows} changes) up to {cuts}"
        + (f"; {result.left_out} messages of transactions unfinished at that point left out"
           if result.left_out else ""))
    if result.in_snapshot:
        progress.finish("the snapshot already holds part of a transaction unfinished at that "
                        "point: " + "; ".join(result.in_snapshot))
    return result


async def roll_back(cfg: Config, target: pitr.Target, force: bool,
                    store_context: rollback.StoreContext, js_context: rollback.JsContext,
                    out: TextIO, err: TextIO) -> int:
    """In place, on a stopped node: prints the positions installed."""
    if not cfg.db_path:
        raise ConfigError("db_path", cfg.db_path, "is required to restore without --output")
    from harmonylite.archive.segment import us_to_rfc3339
    from harmonylite.restore import rollback

    progress = Progress(err)
    try:
        result, positions = await rollback.roll_back(
            cfg, target, store_context=store_context, js_context=js_context, force=force,
            progress=progress)
        progress.finish(
            f"{cfg.db_path} rolled back to {us_to_rfc3339(result.t_us)}: snapshot "
            f"{result.snapshot_id} plus {result.messages} archived messages ({result.rows} "
            "changes); positions at the streams' heads "
            + ",".join(f"{s}={q}" for s, q in sorted(positions.items()))
            + " (the changes after the point are not applied again)")
    finally:
        progress.end()
    out.write(f"{result.snapshot_id}\n")
    return 0


async def window_line(cfg: Config, store: ObjectStore, manifests: list[Manifest]) -> str | None:
    """``restorable window: A .. B`` when the store holds an archive (None otherwise)."""
    from harmonylite.archive import catalog
    from harmonylite.archive.segment import us_to_rfc3339

    archives = await catalog.list_archive(store, namespace(cfg).streams())
    if not any(a.segments or a.head for a in archives.values()):
        return None
    win = catalog.window(manifests, archives)
    if win.start is None:
        return f"restorable window: none ({win.reason})"
    return (f"restorable window: {us_to_rfc3339(win.start_us)} .. {us_to_rfc3339(win.end_us)} "
            f"(from snapshot {win.start.id}; restore with --to-time)")
