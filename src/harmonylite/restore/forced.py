"""`harmonylite snapshot restore` without --output: the forced restore of a stopped node's
database, in one command (docs/recovery.md, "Forcing a restore")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from harmonylite.bus.connection import JsContext
from harmonylite.bus.names import namespace
from harmonylite.bus.streams import ensure_streams, stream_heads
from harmonylite.config import Config
from harmonylite.errors import HarmonyliteError, NatsError, SnapshotError
from harmonylite.restore import db_file
from harmonylite.restore.coverage import choose, gaps
from harmonylite.restore.loop import Restored, RestoreRefused, publish_pending, restore_newest
from harmonylite.snapshot.manifest import Manifest, find_snapshot, list_snapshots
from harmonylite.snapshot.progress import ProgressSink
from harmonylite.storage import ObjectStore

log = logging.getLogger(__name__)

StoreContext = Callable[[], contextlib.AbstractAsyncContextManager[ObjectStore]]


async def forced_restore(cfg: Config, ref: str, *, store_context: StoreContext,
                         js_context: JsContext, force: bool = False,
                         progress: ProgressSink | None = None) -> Restored:
    """The seed's forced restore of a stopped node's ``db_path``, in one command.

    Refuses while the database is open in another process. Pending local changes are published
    first; when they cannot be, the restore is refused naming how many, unless ``force``.
    ``ref`` is ``latest`` (newest sound snapshot, falling back to older ones) or an id (that one).
    """
    db_path, seq_map_path = Path(cfg.db_path), Path(cfg.seq_map_path)
    busy = await asyncio.to_thread(db_file.in_use, db_path)
    if busy:
        raise HarmonyliteError(f"{busy}; stop the node before restoring its database")
    pending = await asyncio.to_thread(db_file.pending_changes, db_path)
    if pending:
        try:
            await _publish_with(cfg, js_context, db_path, pending)
        except Exception as exc:
            refused = exc if isinstance(exc, RestoreRefused) else RestoreRefused(
                pending, f"NATS is unreachable: {exc}")
            if not force:
                raise refused from exc
            log.warning("--force: %d local changes not yet published are discarded (%s)",
                        pending, exc)
    floor = await asyncio.to_thread(db_file.applied_positions, db_path)
    async with store_context() as store:
        if ref in ("", "latest"):
            choice = choose(await list_snapshots(store), floor, {})
            for m, why in choice.skipped:
                log.warning("skipping snapshot %s: it is behind this node's database (%s)",
                            m.id, why, extra={"snapshot_id": m.id})
            candidates = choice.usable
            if not candidates and choice.skipped:
                candidates = await _caught_up_from(cfg, js_context, [m for m, _ in choice.skipped])
                if not candidates:
                    raise SnapshotError(
                        "every snapshot is behind this node's database and the streams no "
                        "longer hold what the node would need to catch up from any of them; "
                        "restoring one would lose rows (name an id with --force to do it)")
        else:
            candidates = [await find_snapshot(store, ref)]
            behind = choose(candidates, floor, {}).skipped
            if behind and not force and not await _caught_up_from(cfg, js_context, candidates):
                raise SnapshotError(f"snapshot {ref} is behind this node's database "
                                    f"({behind[0][1]}) and the streams no longer hold what the "
                                    "node would need to catch up from it; restoring it would "
                                    "lose rows (--force to do it anyway)")

        async def still_stopped() -> None:
            busy = await asyncio.to_thread(db_file.in_use, db_path)
            if busy:
                raise HarmonyliteError(f"{busy}; stop the node before restoring its database")

        return await restore_newest(cfg, store, candidates, db_path=db_path,
                                    seq_map_path=seq_map_path, before_install=still_stopped,
                                    progress=progress)


async def _caught_up_from(cfg: Config, js_context: JsContext,
                          behind: list[Manifest]) -> list[Manifest]:
    """Of snapshots behind the database (newest first), those after whose positions every
    stream still holds every message: restoring one loses nothing, the node replays up to where
    it was (and on). Empty when none, or when the streams cannot be read."""
    try:
        async with js_context() as js:
            heads = await stream_heads(js, namespace(cfg).streams())
    except Exception as exc:  # no coverage known: the caller refuses, naming --force
        log.warning("cannot read the streams to see whether a snapshot behind this node's "
                    "database is still covered: %s", exc)
        return []
    covered = [m for m in behind if not gaps(m.sequences, heads)]
    if covered:
        log.info("snapshot %s is behind this node's database, but the streams still hold every "
                 "message after it: the node catches up to where it was", covered[0].id,
                 extra={"snapshot_id": covered[0].id})
    return covered


async def _publish_with(cfg: Config, js_context: JsContext, db_path: Path, pending: int) -> None:
    """Connect (bounded in time: the client would retry for ever), then publish."""
    limit = (cfg.nats.connect_retries + 1) * (max(cfg.nats.reconnect_wait_seconds, 0) + 5)
    ctx = js_context()
    try:
        js = await asyncio.wait_for(ctx.__aenter__(), limit)
    except TimeoutError as exc:
        raise NatsError(f"no NATS connection within {limit}s") from exc
    try:
        await ensure_streams(js, cfg, timeout=limit)
        await publish_pending(cfg, js, db_path, pending)
    finally:
        await ctx.__aexit__(None, None, None)
