"""Recovery at start: decide whether this node must restore from a snapshot, and do it.

Called by the node after NATS is connected and the streams exist, before change capture is
installed. A node restores when its database file is missing, when its sequence map is missing
(the seed's way to force a snapshot check), or when a stream no longer holds the messages that
follow its position. Otherwise it replays the streams from its positions.

A restore takes the newest committed snapshot that passes every check (size, SHA-256,
``PRAGMA integrity_check``), falling back to older ones; changes still pending in the database it
replaces are published first (or the restore is refused); the verified file is installed under
SQLite's locking (:mod:`harmonylite.node.install`) with the manifest's positions, and the node
replays from exactly the next message of each stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import (
    HarmonyliteError,
    NatsError,
    SnapshotError,
    StorageError,
    VerificationError,
)
from harmonylite.node import install
from harmonylite.replication.nats_link import ensure_streams
from harmonylite.replication.publisher import Publisher
from harmonylite.replication.seqmap import read_seq_map, write_seq_map
from harmonylite.snapshot.manifest import Manifest, find_snapshot, list_snapshots
from harmonylite.snapshot.progress import NullProgress, ProgressSink
from harmonylite.snapshot.restore import fetch, work_dir
from harmonylite.snapshot.storage import ObjectStore, open_store

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node

log = logging.getLogger(__name__)

PUBLISH_TIMEOUT = 30.0
INSTALL_ATTEMPTS = 5


class RestoreRefused(HarmonyliteError):
    """A restore would discard local changes that could not be published."""

    def __init__(self, pending: int, reason: str) -> None:
        self.pending = pending
        super().__init__(
            f"refusing to restore: {pending} local changes not yet published would be lost "
            f"({reason}); bring NATS back and start again so they are published first")


class NoSoundSnapshot(SnapshotError):
    """Every committed snapshot failed a check."""

    def __init__(self, failures: list[str]) -> None:
        self.failures = failures
        super().__init__("no sound snapshot to restore from: " + "; ".join(failures)
                         + "; the database was left untouched")


@dataclass(frozen=True)
class Gap:
    """Messages ``first``..``last`` of ``stream`` are gone from the stream."""

    stream: str
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.stream} {self.first}..{self.last}"


async def stream_heads(js: JetStreamContext, streams: list[str]) -> dict[str, int]:
    """Per stream, the first sequence it still holds (last + 1 when it holds none)."""
    heads: dict[str, int] = {}
    for name in streams:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        except Exception as exc:
            raise NatsError(f"cannot read the state of stream {name}: {exc}") from exc
        state = info.state
        heads[name] = state.first_seq if state.messages else state.last_seq + 1
    return heads


def gaps(positions: dict[str, int], heads: dict[str, int]) -> list[Gap]:
    """The messages a node at ``positions`` needs that the streams no longer hold."""
    out = []
    for stream, first in sorted(heads.items()):
        pos = positions.get(stream, 0)
        if first > pos + 1:
            out.append(Gap(stream, pos + 1, first - 1))
    return out


def lost(positions: dict[str, int], heads: dict[str, int]) -> int:
    return sum(g.last - g.first + 1 for g in gaps(positions, heads))


def _read_map(path: Path) -> dict[str, int] | None:
    try:
        return read_seq_map(path)
    except HarmonyliteError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


# --- choosing and installing a snapshot ------------------------------------------------------
@dataclass(frozen=True)
class Restored:
    manifest: Manifest
    duration: float


async def restore_newest(
    cfg: Config,
    store: ObjectStore,
    candidates: list[Manifest],
    *,
    db_path: Path,
    seq_map_path: Path,
    before_install: Callable[[], Awaitable[None]] | None = None,
    progress: ProgressSink | None = None,
    guard_pending: bool = False,
) -> Restored:
    """Install the first of ``candidates`` (newest first) that passes every check.

    Unsound snapshots are logged (id and failed check) and skipped; the live database is not
    touched until one is verified. ``before_install`` runs right before the install (to publish
    pending changes); it may raise to refuse the restore. With ``guard_pending``, a change the
    application captures after that publish (while the install waits for the write lock) rolls
    the install back, and ``before_install`` runs again before the next try.
    """
    sink = progress or NullProgress()
    started = time.monotonic()
    work = work_dir(cfg.snapshot.temp_dir or None)
    failures: list[str] = []
    try:
        for manifest in candidates:
            verified = work / f"{manifest.id}.db"
            try:
                await fetch(store, manifest, verified, work, sink)
            except VerificationError as exc:
                log.error("snapshot %s is unsound: check %s failed: %s; trying the previous one",
                          manifest.id, exc.check, exc,
                          extra={"snapshot_id": manifest.id, "check": exc.check})
                failures.append(f"{manifest.id} failed {exc.check}")
            except StorageError as exc:
                log.error("snapshot %s cannot be downloaded: %s; trying the previous one",
                          manifest.id, exc, extra={"snapshot_id": manifest.id})
                failures.append(f"{manifest.id} could not be downloaded ({exc})")
            else:
                # A crash from here on must force the check again at the next start.
                check = (lambda: install.check_nothing_pending(db_path)) if guard_pending \
                    else None
                for attempt in range(1, INSTALL_ATTEMPTS + 1):
                    if before_install is not None:
                        await before_install()
                    await asyncio.to_thread(install.remove_durably, seq_map_path)
                    sink.stage("install")
                    try:
                        await asyncio.to_thread(install.install_file, verified, db_path,
                                                manifest.sequences, install.STEP_PAGES, check)
                        break
                    except install.PendingAppeared as exc:
                        if attempt == INSTALL_ATTEMPTS:
                            raise RestoreRefused(exc.count, "the application keeps writing "
                                                 "while the node restores") from exc
                        log.info("%s; publishing them before installing again", exc)
                await asyncio.to_thread(write_seq_map, seq_map_path, manifest.sequences,
                                        durable=True)
                took = time.monotonic() - started
                log.info("Snapshot restored %s (%d bytes) in %.2fs", manifest.id,
                         manifest.db_bytes, took,
                         extra={"snapshot_id": manifest.id, "db_bytes": manifest.db_bytes,
                                "duration": round(took, 3), "path": str(db_path)})
                return Restored(manifest, took)
            with contextlib.suppress(OSError):
                verified.unlink()
        if not failures:
            raise SnapshotError("no committed snapshot in the store")
        raise NoSoundSnapshot(failures)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def publish_pending(cfg: Config, js: JetStreamContext, db_path: Path,
                          pending: int) -> None:
    """Publish the changes pending in ``db_path``; raise RestoreRefused when they cannot go."""
    epoch = await asyncio.to_thread(install.epoch_of, db_path)
    db = DbThread(db_path, "recovery")
    try:
        publisher = Publisher(cfg, db, js, epoch)
        sent = await asyncio.wait_for(publisher.flush(), PUBLISH_TIMEOUT)
    except RestoreRefused:
        raise
    except Exception as exc:
        left = await asyncio.to_thread(install.pending_changes, db_path)
        raise RestoreRefused(left or pending, f"publishing them failed: {exc}") from exc
    finally:
        await asyncio.to_thread(db.close)
    log.info("published %d pending local changes before the restore", sent)


def _log_gaps(found: list[Gap], what: str) -> None:
    for gap in found:
        log.error("messages %d..%d of stream %s are gone from the stream and lost to this node "
                  "(%s); a newer snapshot is needed for it to converge", gap.first, gap.last,
                  gap.stream, what,
                  extra={"stream": gap.stream, "from_seq": gap.first, "to_seq": gap.last})


# --- the decision at start -------------------------------------------------------------------
async def recover(node: Node) -> None:
    """Restore from a snapshot when needed (see the module docstring); else do nothing."""
    cfg = node.cfg
    assert node.js is not None
    db_path, seq_map_path = node.db_path, node.seq_map_path
    db_exists = db_path.exists()
    from_file = await asyncio.to_thread(_read_map, seq_map_path)
    in_db = await asyncio.to_thread(install.applied_positions, db_path) if db_exists else {}
    positions = {**(from_file or {}), **in_db}
    heads = await stream_heads(node.js, cfg.stream_names())
    behind = gaps(positions, heads)
    # Gaps found while running: the positions moved past them, so only the record tells.
    recorded = await asyncio.to_thread(install.recorded_gaps, db_path) if db_exists else {}
    missed = sum(last - first + 1 for first, last in recorded.values())
    reasons = []
    if recorded:
        reasons.append("the streams dropped messages before this node applied them ("
                       + ", ".join(f"{s} {f}..{la}" for s, (f, la) in sorted(recorded.items()))
                       + ")")
    if not db_exists:
        reasons.append(f"database file {db_path} is missing")
    if from_file is None:
        reasons.append(f"sequence map {seq_map_path} is missing")
    if behind and db_exists:
        reasons.append("the streams no longer hold the messages after this node's position ("
                       + ", ".join(map(str, behind)) + ")")
    if not reasons:
        return
    log.info("checking for a snapshot: %s", "; ".join(reasons))
    store = await open_store(cfg.snapshot, js=node.js, bucket=cfg.snapshot_bucket())
    try:
        try:
            candidates = await list_snapshots(store)
        except StorageError as exc:
            if not db_exists:
                raise SnapshotError(f"cannot provision {db_path}: the snapshot store cannot be "
                                    f"listed: {exc}") from exc
            log.error("cannot list snapshots (%s); replaying from this node's positions", exc)
            _log_gaps(behind, "no snapshot could be checked")
            return
        if not candidates:
            await asyncio.to_thread(_no_snapshot, db_path, seq_map_path, db_exists, heads, behind)
            return
        newest = candidates[0]
        if db_exists:
            keep, restore = lost(positions, heads) + missed, lost(newest.sequences, heads)
            better = restore < keep if from_file is not None else restore <= keep
            if not better:
                log.warning("not restoring: the newest snapshot %s would leave this node further "
                            "behind the streams than its database", newest.id,
                            extra={"snapshot_id": newest.id})
                _log_gaps(behind, "no snapshot covers them")
                return

        async def before_install() -> None:
            await _publish_before_restore(node)

        restored = await restore_newest(cfg, store, candidates, db_path=db_path,
                                        seq_map_path=seq_map_path,
                                        before_install=before_install,
                                        guard_pending=cfg.publish)
    finally:
        await store.aclose()
    manifest = restored.manifest
    node.metrics.restored(manifest.id, manifest.created_at)
    _log_gaps(gaps(manifest.sequences, heads), f"snapshot {manifest.id} is older than them")


async def _publish_before_restore(node: Node) -> None:
    if not node.db_path.exists():
        return
    pending = await asyncio.to_thread(install.pending_changes, node.db_path)
    if not pending:
        return
    if not node.cfg.publish:
        log.warning("discarding %d local changes captured while publish = false", pending)
        return
    if node.js is None or node.nc is None or not node.nc.is_connected:
        raise RestoreRefused(pending, "NATS is unreachable")
    await publish_pending(node.cfg, node.js, node.db_path, pending)


def _no_snapshot(db_path: Path, seq_map_path: Path, db_exists: bool, heads: dict[str, int],
                 behind: list[Gap]) -> None:
    if db_exists:
        log.warning("no snapshot in the store; replaying the streams from this node's positions")
        _log_gaps(behind, "no snapshot covers them")
        return
    log.warning("no snapshot in the store: starting with an empty database %s and replaying the "
                "streams from sequence 1", db_path)
    install.create_empty(db_path)
    write_seq_map(seq_map_path, {}, durable=True)
    _log_gaps(gaps({}, heads), "no snapshot covers them")


# --- `harmonylite snapshot restore` without --output ----------------------------------------
StoreContext = Callable[[], contextlib.AbstractAsyncContextManager[ObjectStore]]
JsContext = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


async def forced_restore(cfg: Config, ref: str, *, store_context: StoreContext,
                         js_context: JsContext, force: bool = False,
                         progress: ProgressSink | None = None) -> Restored:
    """The seed's forced restore of a stopped node's ``db_path``, in one command.

    Refuses while the database is open in another process. Pending local changes are published
    first; when they cannot be, the restore is refused naming how many, unless ``force``.
    ``ref`` is ``latest`` (newest sound snapshot, falling back to older ones) or an id (that one).
    """
    db_path, seq_map_path = Path(cfg.db_path), Path(cfg.seq_map_path)
    busy = await asyncio.to_thread(install.in_use, db_path)
    if busy:
        raise HarmonyliteError(f"{busy}; stop the node before restoring its database")
    pending = await asyncio.to_thread(install.pending_changes, db_path)
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
    async with store_context() as store:
        if ref in ("", "latest"):
            candidates = await list_snapshots(store)
        else:
            candidates = [await find_snapshot(store, ref)]

        async def still_stopped() -> None:
            busy = await asyncio.to_thread(install.in_use, db_path)
            if busy:
                raise HarmonyliteError(f"{busy}; stop the node before restoring its database")

        return await restore_newest(cfg, store, candidates, db_path=db_path,
                                    seq_map_path=seq_map_path, before_install=still_stopped,
                                    progress=progress)


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
