"""Taking a snapshot: take → sanitize → compress+hash → upload → verify → commit → prune → cleanup.

One capture runs at a time per process (a second one raises SnapshotBusy at once). Local work
happens in ``{temp_dir}/harmonylite-snapshot-*``, removed at the end whatever happened. The copy is
made by ``VACUUM INTO`` on a fresh connection in a worker thread, so writers keep writing and the
WAL's content is included. The stream sequences the copy contains are read from the copy itself
(``__harmonylite__seq``, written in the applying transactions), so they match its content exactly.
The manifest is written only after the data object was uploaded and its size and hash checked:
a data object without a manifest is not a snapshot, and a failed run deletes what it uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from harmonylite.config import Config
from harmonylite.errors import BUSY_MESSAGE, NoSpaceError, SnapshotBusy, SnapshotError
from harmonylite.snapshot import packing
from harmonylite.snapshot.manifest import (
    Manifest,
    data_key,
    manifest_key,
    new_snapshot_id,
    prune,
    rfc3339,
)
from harmonylite.snapshot.progress import NullProgress, ProgressSink
from harmonylite.snapshot.sealing import seal_manifest
from harmonylite.storage.base import ObjectStore

log = logging.getLogger(__name__)
# Tests set HARMONYLITE_TEST_CLOCK_OFFSET (seconds) to play a node whose clock is wrong: its
# snapshots carry that skewed time. Ordering must not depend on it (stream positions decide).
CLOCK_OFFSET = timedelta(seconds=float(os.environ.get("HARMONYLITE_TEST_CLOCK_OFFSET") or 0))

T = TypeVar("T")
Fence = Callable[[], Awaitable[None]]

WORK_PREFIX = "harmonylite-snapshot-"
SPACE_MARGIN_FRACTION = 0.10
SPACE_MARGIN_BYTES = 16 * 1024 * 1024
CLEANUP_TRIES = 5
CLEANUP_DELAY_SECONDS = 1.0

# One capture per process, whichever event loop or thread asks.
_CAPTURE_LOCK = threading.Lock()


def is_capturing() -> bool:
    """True while a snapshot capture runs in this process."""
    return _CAPTURE_LOCK.locked()


class SnapshotUnchanged(SnapshotError):
    """The database stands exactly where the newest snapshot does: nothing new to store."""

    def __init__(self, sequences: dict[str, int]) -> None:
        self.sequences = sequences
        super().__init__("not taking a snapshot: the database is at the newest snapshot's "
                         f"position ({sequences or 'no stream applied'})")


@dataclass(frozen=True)
class SaveResult:
    manifest: Manifest
    duration: float  # seconds, whole pipeline
    pruned: list[str] = field(default_factory=list)  # ids deleted by retention


async def _in_thread(fn: Callable[[], T], cancel: threading.Event) -> T:
    """Run ``fn`` in a worker thread. On cancellation, ask it to stop and wait for it, so
    nothing keeps writing into the work dir while it is removed."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        cancel.set()
        with contextlib.suppress(BaseException):
            await fut
        raise


class SnapshotPipeline:
    """Captures, uploads and commits snapshots of ``cfg.db_path`` into ``store``."""

    def __init__(
        self, cfg: Config, store: ObjectStore, *, progress: ProgressSink | None = None
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.progress: ProgressSink = progress or NullProgress()

    # -- space --------------------------------------------------------------------------------

    def source_bytes(self) -> int:
        """Size of the database plus its WAL: the most a ``VACUUM INTO`` copy can take."""
        db = Path(self.cfg.db_path)
        try:
            total = db.stat().st_size
        except FileNotFoundError as exc:
            raise SnapshotError(f"database {db} does not exist") from exc
        with contextlib.suppress(FileNotFoundError):
            total += Path(f"{db}-wal").stat().st_size
        return total

    @staticmethod
    def space_needed(source_bytes: int) -> int:
        return int(source_bytes * (1 + SPACE_MARGIN_FRACTION)) + SPACE_MARGIN_BYTES

    def check_free_space(self, work: Path, needed: int) -> None:
        """Raise NoSpaceError unless ``work`` has ``needed`` bytes free."""
        free = shutil.disk_usage(work).free
        if free < needed:
            raise NoSpaceError(str(work), needed, free)

    # -- the pipeline -------------------------------------------------------------------------

    async def save(self, fence: Fence | None = None, *,
                   unless_at: dict[str, int] | None = None) -> SaveResult:
        """Take one snapshot, upload, verify and commit it, then apply retention.

        ``fence`` is awaited right before the manifest is written; it raises LeaseLost (or any
        error) to abort the commit, e.g. when the snapshot lease is no longer ours.
        ``unless_at`` (the newest snapshot's sequences) raises SnapshotUnchanged instead of
        storing a copy at exactly that position: it would add nothing to recovery.
        Raises SnapshotBusy when a capture already runs in this process.
        """
        if not _CAPTURE_LOCK.acquire(blocking=False):
            log.warning(BUSY_MESSAGE)
            raise SnapshotBusy()
        try:
            return await self._save(fence, unless_at)
        finally:
            _CAPTURE_LOCK.release()

    async def _save(self, fence: Fence | None, unless_at: dict[str, int] | None) -> SaveResult:
        started = time.monotonic()
        created = datetime.now(UTC) + CLOCK_OFFSET
        if unless_at is not None:
            live = await asyncio.to_thread(packing.live_sequences, self.cfg.db_path)
            if live == unless_at:
                raise SnapshotUnchanged(live)
        compression = "zstd" if self.cfg.snapshot.compress else "none"
        cancel = threading.Event()
        work = Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=self.cfg.snapshot.temp_dir or None))
        try:
            source = self.source_bytes()
            needed = self.space_needed(source)
            try:
                self.check_free_space(work, needed)
                copy = work / "copy.db"
                self.progress.stage("copy", source)
                db_path = self.cfg.db_path
                await _in_thread(lambda: packing.vacuum_into(db_path, copy, cancel), cancel)
                self.progress.advance(source)
                self.progress.stage("sanitize")
                facts = await _in_thread(lambda: packing.sanitize(copy), cancel)
                if unless_at is not None and facts.sequences == unless_at:
                    raise SnapshotUnchanged(facts.sequences)
                self.progress.stage("compress" if compression == "zstd" else "hash", facts.db_bytes)
                # The copy is proven sound while it is compressed (both only read it): a
                # snapshot whose manifest is committed passed integrity_check.
                checking = asyncio.ensure_future(asyncio.to_thread(packing.check_sound, copy))
                try:
                    packed = await _in_thread(
                        lambda: packing.pack(copy, compression, self.progress.advance, cancel),
                        cancel,
                    )
                finally:
                    problem = await checking
                if problem:
                    raise SnapshotError(f"the copy of {db_path} failed integrity_check: {problem}"
                                        " (the source database may be damaged)")
            except packing.DiskFull as exc:
                free = shutil.disk_usage(work).free
                err = NoSpaceError(str(work), needed, free)
                log.error("%s (during %s)", err, exc.step)
                raise err from exc.__cause__
            except NoSpaceError as exc:
                log.error("%s", exc)
                raise
            sid = new_snapshot_id(self.cfg.node_id, created, facts.sequences)
            manifest = Manifest(
                id=sid,
                node_id=self.cfg.node_id,
                created_at=rfc3339(created),
                db_bytes=packed.db_bytes,
                db_sha256=packed.db_sha256,
                stored_bytes=packed.stored_bytes,
                stored_sha256=packed.stored_sha256,
                compression=compression,
                sequences=facts.sequences,
                schema_hash=facts.schema_hash,
                tables=facts.tables,
                origins=facts.origins,
                parked=facts.parked,
                # (A node that does not publish never sends them: no point waits for them.)
                local=facts.local if self.cfg.publish else {},
            )
            manifest = seal_manifest(self.store, manifest)
            await self._upload_and_commit(manifest, packed.path, fence)
            pruned = await self._prune()
        finally:
            await self._cleanup(work)
        duration = time.monotonic() - started
        log.info(
            "Snapshot saved %s",
            sid,
            extra={
                "snapshot_id": sid,
                "db_bytes": manifest.db_bytes,
                "stored_bytes": manifest.stored_bytes,
                "duration": round(duration, 3),
                "store": self.store.name,
            },
        )
        self.progress.finish(f"snapshot {sid} saved")
        return SaveResult(manifest, duration, pruned)

    async def _upload_and_commit(self, manifest: Manifest, path: Path, fence: Fence | None) -> None:
        key = data_key(manifest.id, manifest.compression)
        uploaded = committing = False
        try:
            self.progress.stage("upload", manifest.stored_bytes)
            uploaded = True  # from here on, the data object may exist in the store
            info = await self.store.upload(key, path)
            self.progress.advance(manifest.stored_bytes)
            self.progress.stage("verify")
            for found in (info, await self.store.stat(key)):
                packing.check_object(manifest, found.size, found.sha256)
            if fence is not None:
                await fence()
            self.progress.stage("commit")
            committing = True
            await self.store.upload_bytes(manifest_key(manifest.id), manifest.to_json())
        except BaseException as exc:
            log.error(
                "Upload failed: %s",
                packing.reason(exc),
                extra={"snapshot_id": manifest.id, "store": self.store.name},
            )
            if uploaded:
                await self._discard(key, manifest_key(manifest.id) if committing else None)
            raise

    async def _discard(self, key: str, manifest: str | None) -> None:
        """Delete what a failed run may have stored: the manifest first, then the data."""
        for k in (manifest, key):
            if k is None:
                continue
            try:
                await self.store.delete(k)
            except Exception as exc:
                log.warning("could not delete %s after a failed upload: %s", k, packing.reason(exc))

    async def _prune(self) -> list[str]:
        """Retention after a commit; a failure here does not undo the committed snapshot."""
        try:
            snap = self.cfg.snapshot
            # With the archive on, snapshots stay as long as its history does.
            since = datetime.now(UTC) - timedelta(milliseconds=snap.archive_retention) \
                if snap.archive else None
            removed = await prune(self.store, snap.keep, since)
        except Exception as exc:
            log.warning("pruning old snapshots failed: %s", packing.reason(exc))
            return []
        for sid in removed:
            log.info("deleted old snapshot %s", sid, extra={"snapshot_id": sid})
        return removed

    async def _cleanup(self, work: Path) -> None:
        last: OSError | None = None
        for attempt in range(CLEANUP_TRIES):
            try:
                await asyncio.to_thread(shutil.rmtree, work)
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                last = exc
            if attempt + 1 < CLEANUP_TRIES:
                await asyncio.sleep(CLEANUP_DELAY_SECONDS)  # retry backoff, not synchronisation
        log.error("Unable to cleanup temp path %s: %s", work, last, extra={"path": str(work)})


class HeadsPipeline(SnapshotPipeline):
    """The pipeline, recording in the manifest the stream heads the capture started against."""

    def __init__(self, cfg: Config, store: ObjectStore, heads: dict[str, int]) -> None:
        super().__init__(cfg, store)
        self.heads = heads

    async def _upload_and_commit(self, manifest: Manifest, path: Path,
                                 fence: Fence | None) -> None:
        # Heads may be read a moment before the copy's own sequences: never report less than
        # what the copy holds.
        heads = {s: max(h, manifest.sequences.get(s, 0)) for s, h in self.heads.items()}
        await super()._upload_and_commit(replace(manifest, heads=heads), path, fence)
