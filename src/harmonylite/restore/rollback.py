"""`snapshot restore --to-time T` without ``--output``: a stopped node's database rolled back
to a point in time, in place.

The node's database becomes the cluster's state at T (see :mod:`.point_in_time`), installed as
a forced restore installs a snapshot (capture, origins' marks and parked changes with it, under
SQLite's locking), with one difference: its positions are the streams' *current* heads, so the
node does not apply again what came after T. Rolling a whole cluster back is therefore: stop
every node, roll each back to the same T (each gets the same content), start them, and take a
snapshot (`snapshot save`) so a node that joins later restores the rolled-back state. The
changes after T stay in the streams and the archive (a restore to a later point still sees
them).

Refused while the database is open in another process, and when it holds local changes not
yet published (they were written after T; ``--force`` discards them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.errors import HarmonyliteError, NatsError
from harmonylite.replication.seqmap import write_seq_map
from harmonylite.restore import db_file
from harmonylite.restore import point_in_time as pitr
from harmonylite.restore.verify import work_dir
from harmonylite.snapshot.progress import ProgressSink
from harmonylite.storage import ObjectStore

log = logging.getLogger(__name__)

StoreContext = Callable[[], contextlib.AbstractAsyncContextManager[ObjectStore]]
JsContext = Callable[[], contextlib.AbstractAsyncContextManager[JetStreamContext]]


async def stream_ends(js: JetStreamContext, streams: list[str]) -> dict[str, int]:
    """Each stream's last sequence (0 for a stream that does not exist)."""
    out: dict[str, int] = {}
    for name in streams:
        try:
            info = await js.stream_info(name)
        except Exception as exc:
            if type(exc).__name__ == "NotFoundError":
                out[name] = 0
                continue
            raise NatsError(f"cannot read the state of stream {name}: {exc}") from exc
        out[name] = int(info.state.last_seq)
    return out


async def roll_back(cfg: Config, target: pitr.Target, *, store_context: StoreContext,
                    js_context: JsContext, force: bool = False,
                    progress: ProgressSink | None = None) -> tuple[pitr.Outcome, dict[str, int]]:
    """Roll this stopped node's ``db_path`` back to ``target``; returns the outcome and the
    positions installed (the streams' heads)."""
    db_path, seq_map = Path(cfg.db_path), Path(cfg.seq_map_path)
    busy = await asyncio.to_thread(db_file.in_use, db_path)
    if busy:
        raise HarmonyliteError(f"{busy}; stop the node before rolling its database back")
    pending = await asyncio.to_thread(db_file.pending_changes, db_path)
    if pending and not force:
        raise HarmonyliteError(f"{pending} local changes of this node are not published yet; "
                               "rolling back would discard them (start the node to publish "
                               "them first, or --force to discard them)")
    streams = namespace(cfg).streams()
    async with js_context() as js:
        heads = await stream_ends(js, streams)
    work = work_dir(cfg.snapshot.temp_dir or None)
    try:
        result = work / "rolled-back.db"
        async with store_context() as store:
            outcome = await pitr.restore(store, streams, target, result, work=work,
                                         replicated=cfg.replicates_table,
                                    replicate_ddl=cfg.replicate_ddl, progress=progress)
        positions = {s: max(heads.get(s, 0), outcome.cuts.get(s, 0)) for s in streams}
        carried = db_file.Carried(outcome.origins, outcome.parked)
        await asyncio.to_thread(db_file.prepare_for, result, db_path, positions, carried,
                                cfg.replicates_table)
        busy = await asyncio.to_thread(db_file.in_use, db_path)
        if busy:
            raise HarmonyliteError(f"{busy}; stop the node before rolling its database back")
        # Checked again under the install's write lock: an application that wrote meanwhile
        # rolls the install back rather than losing its change.
        check = None if force else (lambda: db_file.check_nothing_pending(db_path))
        try:
            await asyncio.to_thread(db_file.install_file, result, db_path, positions,
                                    locked_check=check, prepared=True)
        except db_file.PendingAppeared as exc:
            raise HarmonyliteError(f"{exc}; the database was left as it was (stop the "
                                   "application, or --force to discard them)") from exc
        await asyncio.to_thread(write_seq_map, seq_map, positions, durable=True)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    log.info("Snapshot restored %s and the archive up to %s into %s (positions at the "
             "streams' heads)", outcome.snapshot_id, target.describe(), db_path,
             extra={"snapshot_id": outcome.snapshot_id, "path": str(db_path)})
    return outcome, positions
