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
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from harmonylite.aio import wait_any
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import (
    HarmonyliteError,
    NatsError,
    NoSpaceError,
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


NATS_HINT = "bring NATS back and start again so they are published first"


class RestoreRefused(HarmonyliteError):
    """A restore would discard local changes that could not be published."""

    def __init__(self, pending: int, reason: str, hint: str = NATS_HINT) -> None:
        self.pending = pending
        super().__init__(
            f"refusing to restore: {pending} local changes not yet published would be lost "
            f"({reason}); {hint}")


class InstallTimedOut(HarmonyliteError):
    """The application held the write lock, or kept writing, for all of snapshot.restore_timeout."""


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
            except NoSpaceError:
                raise  # the local disk: an older snapshot would not fit either
            except StorageError as exc:
                log.error("snapshot %s cannot be downloaded: %s; trying the previous one",
                          manifest.id, exc, extra={"snapshot_id": manifest.id})
                failures.append(f"{manifest.id} could not be downloaded ({exc})")
            else:
                carried = install.Carried(manifest.origins, manifest.parked)
                await asyncio.to_thread(install.prepare_for, verified, db_path,
                                        manifest.sequences, carried)
                # A crash from here on must force the check again at the next start.
                check = (lambda: install.check_nothing_pending(db_path)) if guard_pending \
                    else None
                await _install_until_done(cfg, verified, db_path, seq_map_path, manifest,
                                          before_install, check, sink)
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


async def _install_until_done(
    cfg: Config, verified: Path, db_path: Path, seq_map_path: Path, manifest: Manifest,
    before_install: Callable[[], Awaitable[None]] | None, check: Callable[[], None] | None,
    sink: ProgressSink,
) -> None:
    """Install, trying again while the application holds the write lock or writes between
    the last publish and the lock, for at most ``snapshot.restore_timeout``."""
    bound = cfg.snapshot.restore_timeout / 1000.0
    deadline = time.monotonic() + bound
    attempt = 0
    while True:
        attempt += 1
        if before_install is not None:
            await before_install()
        await asyncio.to_thread(install.remove_durably, seq_map_path)
        sink.stage("install")
        try:
            await asyncio.to_thread(install.install_file, verified, db_path, manifest.sequences,
                                    install.STEP_PAGES, check, None, True)
            return
        except install.PendingAppeared as exc:
            if time.monotonic() >= deadline:
                raise RestoreRefused(
                    exc.count, f"the application kept writing for {bound:.0f} s while the node "
                    f"restored {db_path} ({attempt} tries)",
                    "stop the writes for a moment, or raise snapshot.restore_timeout") from exc
            log.info("%s; publishing them before installing again (try %d)", exc, attempt)
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc):
                raise
            if time.monotonic() >= deadline:
                raise InstallTimedOut(
                    f"cannot restore {db_path}: another connection held its write lock for "
                    f"{bound:.0f} s (snapshot.restore_timeout); the database was left as it was"
                ) from exc
            log.warning("waiting for the write lock on %s to install snapshot %s: %s; still "
                        "trying for %.0f s more (snapshot.restore_timeout)", db_path,
                        manifest.id, exc, max(0.0, deadline - time.monotonic()),
                        extra={"path": str(db_path), "snapshot_id": manifest.id})


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
@dataclass(frozen=True)
class Choice:
    covering: list[Manifest]  # at or ahead of the database, and inside every stream: usable
    usable: list[Manifest]  # at or ahead of the database (may leave a stream gap)
    skipped: list[tuple[Manifest, str]]  # behind the database: never installed


def choose(candidates: list[Manifest], floor: dict[str, int], heads: dict[str, int]) -> Choice:
    """Split ``candidates`` (newest first) by what installing each would do to this node."""
    usable: list[Manifest] = []
    skipped: list[tuple[Manifest, str]] = []
    for m in candidates:
        behind = sorted((s, m.sequences.get(s, 0), p) for s, p in floor.items()
                        if m.sequences.get(s, 0) < p)
        if behind:
            skipped.append((m, ", ".join(f"{s} at {q} < {p} in this node's database"
                                         for s, q, p in behind)))
        else:
            usable.append(m)
    covering = [m for m in usable if not gaps(m.sequences, heads)]
    return Choice(covering, usable, skipped)


def _need(heads: dict[str, int]) -> dict[str, int]:
    """Per stream, the sequence a snapshot must reach to be inside what the stream holds."""
    return {s: first - 1 for s, first in heads.items() if first > 1}


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
    diverged = db_exists and bool(behind or recorded)
    # Never go backwards: a snapshot behind what this database already holds would lose rows.
    floor = positions if db_exists else {}
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
        choice = choose(candidates, floor, heads)
        for m, why in choice.skipped:
            log.warning("skipping snapshot %s: it is behind this node's database (%s)", m.id,
                        why, extra={"snapshot_id": m.id})
        targets = choice.covering
        if not targets and (diverged or not db_exists) and (candidates or gaps({}, heads)):
            targets, heads = await _ask_and_wait(node, store, floor)
        if not targets:
            if db_exists:
                if choice.usable and not diverged:
                    log.warning("not restoring: snapshot %s would leave this node behind what "
                                "the streams hold, and its database is not",
                                choice.usable[0].id, extra={"snapshot_id": choice.usable[0].id})
                elif not candidates:
                    log.warning("no snapshot in the store; replaying the streams from this "
                                "node's positions")
                _log_gaps(gaps(positions, heads), "no snapshot covers them")
                _log_uncovered(recorded, "no snapshot covers them")
                return
            if not choice.usable:
                await asyncio.to_thread(_no_snapshot, db_path, seq_map_path, heads)
                return
            targets = choice.usable  # better than an empty database; the gap stays loud

        async def before_install() -> None:
            await _publish_before_restore(node)

        restored = await restore_newest(cfg, store, targets, db_path=db_path,
                                        seq_map_path=seq_map_path,
                                        before_install=before_install,
                                        guard_pending=cfg.publish)
    finally:
        await store.aclose()
    manifest = restored.manifest
    node.metrics.restored(manifest.id, manifest.created_at)
    _log_gaps(gaps(manifest.sequences, heads), f"snapshot {manifest.id} is older than them")


def _log_uncovered(recorded: dict[str, tuple[int, int]], what: str) -> None:
    _log_gaps([Gap(s, f, la) for s, (f, la) in sorted(recorded.items())], what)


async def _ask_and_wait(node: Node, store: ObjectStore, floor: dict[str, int]
                        ) -> tuple[list[Manifest], dict[str, int]]:
    """No snapshot covers this node: ask the leader for one and wait (snapshot.request_timeout),
    looking at the streams and the store again every second. Returns the covering snapshots
    found (empty when none came) and the streams' heads at the last look."""
    from harmonylite.snapshot import request

    cfg = node.cfg
    assert node.js is not None
    bound = cfg.snapshot.request_timeout / 1000.0
    deadline = time.monotonic() + bound
    heads = await stream_heads(node.js, cfg.stream_names())
    log.warning("no snapshot covers what this node lacks (%s); asked the snapshot leader for "
                "one, waiting up to %.0f s (snapshot.request_timeout)",
                ", ".join(f"{s} up to {q}" for s, q in sorted(_need(heads).items())) or "-",
                bound)
    asked = False
    try:
        while True:
            try:
                await request.ask(node.js, cfg.snapshot.leader_ttl, cfg.node_id, _need(heads))
                asked = True
            except Exception as exc:
                log.warning("cannot ask the leader for a snapshot: %s", exc)
            try:
                found = choose(await list_snapshots(store), floor, heads).covering
            except StorageError as exc:
                log.warning("cannot list snapshots: %s", exc)
                found = []
            if found:
                log.info("snapshot %s covers this node now", found[0].id,
                         extra={"snapshot_id": found[0].id})
                return found, heads
            if time.monotonic() >= deadline or node.stop_event.is_set():
                return [], heads
            # The polling period of an outside resource (the store), not a synchronisation.
            await wait_any(node.stop_event, timeout=1.0)
            heads = await stream_heads(node.js, cfg.stream_names())
    finally:
        if asked:
            try:
                await request.withdraw(node.js, cfg.snapshot.leader_ttl)
            except Exception as exc:  # it expires with the bucket's TTL anyway
                log.debug("cannot withdraw the snapshot request: %s", exc)


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


def _no_snapshot(db_path: Path, seq_map_path: Path, heads: dict[str, int]) -> None:
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
    floor = await asyncio.to_thread(install.applied_positions, db_path)
    async with store_context() as store:
        if ref in ("", "latest"):
            choice = choose(await list_snapshots(store), floor, {})
            for m, why in choice.skipped:
                log.warning("skipping snapshot %s: it is behind this node's database (%s)",
                            m.id, why, extra={"snapshot_id": m.id})
            candidates = choice.usable
            if not candidates and choice.skipped:
                raise SnapshotError("every snapshot is behind this node's database; restoring "
                                    "one would lose rows (name an id with --force to do it)")
        else:
            candidates = [await find_snapshot(store, ref)]
            behind = choose(candidates, floor, {}).skipped
            if behind and not force:
                raise SnapshotError(f"snapshot {ref} is behind this node's database "
                                    f"({behind[0][1]}); restoring it would lose rows (--force "
                                    "to do it anyway)")

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
