"""The database made ready at start, before anything is applied or published.

In this order: rows of its own are found (a join, ``restore.join``); a database HarmonyLite ran
on is taken over (its pending changes kept); the start-up recovery restores a snapshot when the
node is new, lost its data or fell behind the streams; change capture is installed, schema
changes made while the node was stopped are captured, HarmonyLite's pending changes and a
merge's rows are replayed through it; and this start's epoch is adopted.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from harmonylite.cdc import origin, schema_changes, takeover
from harmonylite.cdc.install import InstallReport, install
from harmonylite.db.connection import DbThread
from harmonylite.errors import HarmonyliteError
from harmonylite.replication.read_ahead import ReadAhead
from harmonylite.restore import join
from harmonylite.restore.at_start import StartParts, recover

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    install_report: InstallReport
    own_origins: dict[str, int | None]  # this database's origins (see ``cdc.origin``)
    restored: str | None  # the snapshot this start restored, if any


async def prepare(parts: StartParts, writer: DbThread, epoch: str,
                  readers: dict[str, ReadAhead]) -> Prepared:
    """Make the database ready (see the module docstring). The streams read ahead during a
    restore go into ``readers`` as soon as there are any (the node stops them if the start
    fails after)."""
    cfg, db_path, stop = parts.cfg, parts.db_path, parts.stop
    joining: join.Joining | None = None
    if cfg.replicate and cfg.snapshot.enabled:
        # Before anything writes to it: rows of its own are never replaced by the cluster's
        # snapshot unless the operator chose how (snapshot.join; docs/recovery.md).
        joining = await join.check(cfg, parts.js, db_path, parts.seq_map_path)
    if db_path.exists():
        # A database HarmonyLite ran on: its layout goes, its pending changes are kept (and
        # its positions read) before anything could restore over it.
        await writer.call_waiting(lambda c: takeover.take_over(c, parts.seq_map_path),
                                  "start", stop)
    restored: str | None = None
    if cfg.replicate and cfg.snapshot.enabled:
        # Restore from a snapshot when this node is new, lost its data or fell behind what
        # the streams still hold (and publish its pending changes first).
        recovery = await recover(dataclasses.replace(parts, joining=joining))
        restored = recovery.restored
        readers.update(recovery.readers)
        joining = recovery.joining
    if not db_path.exists():
        raise HarmonyliteError(f"database file {db_path} does not exist")
    report = await writer.call_waiting(
        lambda conn: install(conn, cfg.replicates_table), "install change capture", stop)
    if cfg.replicate_ddl:
        # A schema change made while the node was stopped is this node's to send.
        await writer.call_waiting(
            lambda conn: schema_changes.capture_now(conn, cfg.node_id, cfg.replicates_table),
            "start", stop)
    # HarmonyLite's pending changes, through our capture.
    await writer.call_waiting(takeover.replay_pending, "start", stop)
    # A merge's rows, through our capture.
    await join.finish(joining, cfg, db_path, writer, restored)
    own_origins = await writer.call_waiting(
        lambda c: origin.adopt(c, cfg.node_id, epoch, db_path), "start", stop)
    log.info("change capture installed", extra={"tables": len(report.tables)})
    return Prepared(report, own_origins, restored)
