"""Installing a snapshot: the newest candidate that passes every check, with the fallback to
older ones, the retries while the application holds the write lock or writes, and the publish
of pending local changes that must go out before a database is replaced."""

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
from typing import TypeVar

from nats.js import JetStreamContext

from harmonylite.aio import Patience
from harmonylite.cdc import origin
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import (
    HarmonyliteError,
    NoSpaceError,
    SnapshotError,
    StorageError,
    StorageUnavailable,
    VerificationError,
)
from harmonylite.replication.publisher import Publisher
from harmonylite.replication.seqmap import write_seq_map
from harmonylite.restore import db_file
from harmonylite.restore.verify import fetch, work_dir
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.snapshot.progress import NullProgress, ProgressSink
from harmonylite.snapshot.sealing import opened
from harmonylite.storage import ObjectStore

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
                parked = (await opened(store, manifest)).parked
                carried = db_file.Carried(manifest.origins, parked)
                await asyncio.to_thread(db_file.prepare_for, verified, db_path,
                                        manifest.sequences, carried, cfg.replicates_table)
                # A crash from here on must force the check again at the next start.
                check = (lambda: db_file.check_nothing_pending(db_path)) if guard_pending \
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
        await asyncio.to_thread(db_file.remove_durably, seq_map_path)
        sink.stage("install")
        try:
            await asyncio.to_thread(db_file.install_file, verified, db_path, manifest.sequences,
                                    db_file.STEP_PAGES, check, None, True)
            return
        except db_file.PendingAppeared as exc:
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
    db = DbThread(db_path, "recovery")
    try:
        # Under an epoch of their own (see ``origin``): the database that replaces this one
        # starts its change ids over, and must not publish them under the same origin.
        epoch = origin.new_epoch()
        await db.call(lambda c: origin.adopt(c, cfg.node_id, epoch))
        publisher = Publisher(cfg, db, js, epoch)
        sent = await asyncio.wait_for(publisher.flush(), PUBLISH_TIMEOUT)
    except RestoreRefused:
        raise
    except Exception as exc:
        left = await asyncio.to_thread(db_file.pending_changes, db_path)
        raise RestoreRefused(left or pending, f"publishing them failed: {exc}") from exc
    finally:
        await asyncio.to_thread(db.close)
    log.info("published %d pending local changes before the restore", sent)


T = TypeVar("T")

LIST_PATIENCE = 60.0  # seconds a store answering "unavailable" (or timing out) is retried at start


async def patiently(call: Callable[[], Awaitable[T]]) -> T:
    """Open or list the store; while it says it is unavailable (a JetStream cluster still
    forming answers 503, or times out, for seconds), retry for a while before giving up with
    the last error."""
    patience = Patience(LIST_PATIENCE, 0.5)
    said = False
    while True:
        try:
            return await call()
        except StorageUnavailable as exc:
            if patience.exhausted:
                raise
            if not said:  # once: the wait may be long, and its end is logged by the caller
                log.warning("the snapshot store is not available yet (%s); trying again for "
                            "up to %.0f s", exc, LIST_PATIENCE)
                said = True
            await patience.wait()


async def list_patiently(store: ObjectStore) -> list[Manifest]:
    """List the store's snapshots, retried while it is unavailable (see :func:`patiently`)."""
    return await patiently(lambda: list_snapshots(store))
