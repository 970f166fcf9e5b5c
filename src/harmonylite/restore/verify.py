"""Downloading a committed snapshot and proving it sound.

The stored object is downloaded into a temp dir, then read once: its SHA-256 is computed while
it is decompressed (zstd, streaming) into the destination, whose SHA-256 is computed as it is
written. Checks, in order, each named in the VerificationError it raises: ``size`` and ``sha256``
of the stored object, ``decompress``, ``size`` and ``sha256`` of the database, then
``integrity_check`` (``PRAGMA integrity_check`` on the result). Memory does not grow with the
snapshot.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, BinaryIO, Protocol, cast

import zstandard

from harmonylite.errors import NoSpaceError, SnapshotError, StorageError, VerificationError
from harmonylite.snapshot.manifest import Manifest
from harmonylite.snapshot.packing import CHUNK, check_sound
from harmonylite.snapshot.pipeline import WORK_PREFIX
from harmonylite.snapshot.progress import NullProgress, ProgressSink
from harmonylite.storage.base import ObjectStore
from harmonylite.storage.streaming import ObjectStream, open_stream

log = logging.getLogger(__name__)


def _fail(m: Manifest, check: str, detail: str) -> VerificationError:
    return VerificationError(m.id, check, detail)


class _Readable(Protocol):
    def read(self, n: int, /) -> bytes: ...


class _DbWriter:
    """Hashes and writes the database on a worker thread, so that decompression overlaps with
    it (both release the GIL); at most ``depth`` chunks are in flight."""

    def __init__(self, out: BinaryIO, depth: int = 4) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="restore-write")
        self._inflight: deque[Future[None]] = deque()

    def _consume(self, data: bytes) -> None:
        self.sha.update(data)
        self.out.write(data)

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self._inflight.append(self._pool.submit(self._consume, data))
        while len(self._inflight) > self._depth:
            self._inflight.popleft().result()

    def close(self) -> None:
        try:
            while self._inflight:
                self._inflight.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> _DbWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Source:
    """What the decompressor reads: the stored bytes, hashed and counted as they pass."""

    def __init__(self, src: _Readable, progress: ProgressSink) -> None:
        self._src = src
        self._progress = progress
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = CHUNK) -> bytes:
        data = self._src.read(n if n > 0 else CHUNK)
        if data:
            self.sha.update(data)
            self.size += len(data)
            self._progress.advance(len(data))
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass


def unpack(m: Manifest, stored: Path, dest: Path, progress: ProgressSink) -> None:
    """Check the downloaded ``stored`` against the manifest and write the database to ``dest``
    (not synced)."""
    size = stored.stat().st_size
    if size != m.stored_bytes:
        raise _fail(m, "size", f"stored object has {size} bytes, expected {m.stored_bytes}")
    with stored.open("rb") as src:
        _unpack(m, src, dest, progress)


def unpack_stream(m: Manifest, stream: ObjectStream, dest: Path, progress: ProgressSink) -> None:
    """:func:`unpack` straight from the store: download, decompression, both hashes and the
    write overlap (the stream fetches ahead on its own threads, the database is hashed and
    written on another). Nothing but ``dest`` is written, and the checks are the same."""
    try:
        if stream.size != m.stored_bytes:
            raise _fail(m, "size", f"stored object has {stream.size} bytes, "
                        f"expected {m.stored_bytes}")
        _unpack(m, stream, dest, progress)
    finally:
        stream.close()


def _unpack(m: Manifest, src: _Readable, dest: Path, progress: ProgressSink) -> None:
    stored = _Source(src, progress)
    broken: Exception | None = None
    with dest.open("wb") as out_file, _DbWriter(out_file) as out:
        if m.compression == "zstd":
            # read_to_iter hands out at most CHUNK bytes at a time however well the data
            # compresses (a run of zeroed pages expands a thousandfold).
            dctx = zstandard.ZstdDecompressor()
            try:
                # Any object with read() will do; the stubs ask for a file.
                source = cast(IO[bytes], stored)
                for data in dctx.read_to_iter(source, read_size=CHUNK, write_size=CHUNK):
                    out.write(data)
            except zstandard.ZstdError as exc:
                broken = exc
            stored.drain()  # the whole object is hashed, to name the right check
        else:
            while chunk := stored.read(CHUNK):
                out.write(chunk)
    db_sha, db_size = out.sha, out.size
    if stored.size != m.stored_bytes:
        raise _fail(m, "size", f"stored object ended after {stored.size} bytes, "
                    f"expected {m.stored_bytes}")
    if stored.sha.hexdigest() != m.stored_sha256:
        raise _fail(m, "sha256", f"stored object has sha256 {stored.sha.hexdigest()}, "
                    f"expected {m.stored_sha256}")
    if broken is not None:
        raise _fail(m, "decompress", str(broken) or type(broken).__name__)
    if m.compression == "zstd" and db_size < m.db_bytes:
        raise _fail(m, "decompress", f"compressed stream ends early ({db_size} of "
                    f"{m.db_bytes} bytes)")
    if db_size != m.db_bytes:
        raise _fail(m, "size", f"database has {db_size} bytes, expected {m.db_bytes}")
    if db_sha.hexdigest() != m.db_sha256:
        raise _fail(m, "sha256", f"database has sha256 {db_sha.hexdigest()}, "
                    f"expected {m.db_sha256}")


def integrity_check(m: Manifest, db: Path) -> None:
    problem = check_sound(db)
    if problem:
        raise _fail(m, "integrity_check", problem)


async def fetch(
    store: ObjectStore, m: Manifest, dest: Path, work: Path, progress: ProgressSink,
    *, sync: bool = False, integrity: bool = True,
) -> None:
    """Download ``m`` and write its verified database to ``dest``.

    Raises VerificationError naming the failed check; ``dest`` is then unsound and unused.
    With ``sync``, ``dest`` is on disk (fsync) when it returns. Without ``integrity``, the
    ``integrity_check`` is not repeated: matching size and SHA-256 already prove the file is,
    byte for byte, the copy that passed ``integrity_check`` before its manifest was committed.
    A store that streams the object (see :mod:`harmonylite.storage.streaming`) is read straight
    into ``dest``; otherwise the object is downloaded into ``work`` first.
    """
    progress.stage("download", m.stored_bytes)
    stream = await open_stream(store, m.data_key)
    if stream is None:
        await _download_and_unpack(store, m, dest, work, progress)
    else:
        try:
            check_local_space(work, dest.parent, m, streamed=True)
            await asyncio.to_thread(unpack_stream, m, stream, dest, progress)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise NoSpaceError(str(dest.parent), m.db_bytes + SPACE_MARGIN_BYTES,
                                   shutil.disk_usage(dest.parent).free) from exc
            raise
        finally:
            await asyncio.to_thread(stream.close)
    if not integrity:
        if sync:
            await asyncio.to_thread(_fsync, dest)
        return
    progress.stage("integrity_check")
    if sync:  # the flush to disk overlaps with the check, which reads from the page cache
        await asyncio.gather(asyncio.to_thread(integrity_check, m, dest),
                             asyncio.to_thread(_fsync, dest))
    else:
        await asyncio.to_thread(integrity_check, m, dest)


SPACE_MARGIN_BYTES = 1024 * 1024


async def _download_and_unpack(store: ObjectStore, m: Manifest, dest: Path, work: Path,
                               progress: ProgressSink) -> None:
    stored = work / ("stored-" + Path(m.data_key).name)
    check_local_space(work, dest.parent, m)
    try:
        await store.download(m.data_key, stored)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise _no_space(work, m) from exc
        raise
    except StorageError as exc:
        # A backend reports its own failures; when the local disk is what filled up, say so.
        if _local_full(work, m.stored_bytes):
            raise _no_space(work, m) from exc
        raise
    progress.advance(m.stored_bytes)
    progress.stage("decompress" if m.compression == "zstd" else "hash", m.stored_bytes)
    try:
        await asyncio.to_thread(unpack, m, stored, dest, progress)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise NoSpaceError(str(dest.parent), m.db_bytes + m.stored_bytes,
                               shutil.disk_usage(dest.parent).free) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            stored.unlink()


def _needed(m: Manifest) -> int:
    return m.stored_bytes + m.db_bytes + SPACE_MARGIN_BYTES


def _no_space(work: Path, m: Manifest) -> NoSpaceError:
    return NoSpaceError(str(work), _needed(m), shutil.disk_usage(work).free)


def _local_full(path: Path, bytes_needed: int) -> bool:
    try:
        return shutil.disk_usage(path).free < bytes_needed
    except OSError:
        return False


def check_local_space(work: Path, dest_dir: Path, m: Manifest, *, streamed: bool = False) -> None:
    """NoSpaceError naming the local directory, the bytes needed and free, before downloading:
    a full local disk is not the store's fault, nor the snapshot's. ``streamed``: the stored
    object is not kept locally, only the database is written."""
    if streamed:
        free = shutil.disk_usage(dest_dir).free
        if free < m.db_bytes + SPACE_MARGIN_BYTES:
            raise NoSpaceError(str(dest_dir), m.db_bytes + SPACE_MARGIN_BYTES, free)
        return
    same = os.stat(work).st_dev == os.stat(dest_dir).st_dev
    wants = [(work, _needed(m))] if same else [(work, m.stored_bytes + SPACE_MARGIN_BYTES),
                                                (dest_dir, m.db_bytes + SPACE_MARGIN_BYTES)]
    for path, needed in wants:
        free = shutil.disk_usage(path).free
        if free < needed:
            raise NoSpaceError(str(path), needed, free)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def work_dir(temp_dir: str | None) -> Path:
    """A fresh ``{temp_dir}/harmonylite-snapshot-*`` directory (the OS temp dir by default)."""
    return Path(tempfile.mkdtemp(prefix=WORK_PREFIX, dir=temp_dir or None))


async def verify_snapshot(
    store: ObjectStore,
    manifest: Manifest,
    *,
    temp_dir: str | None = None,
    progress: ProgressSink | None = None,
) -> float:
    """Download and check a snapshot, keeping nothing; returns the seconds it took.

    Raises VerificationError naming the failed check.
    """
    sink = progress or NullProgress()
    started = time.monotonic()
    work = work_dir(temp_dir)
    try:
        await fetch(store, manifest, work / f"{manifest.id}.db", work, sink)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    took = time.monotonic() - started
    log.info("Snapshot verified %s", manifest.id,
             extra={"snapshot_id": manifest.id, "duration": round(took, 3)})
    sink.finish(f"snapshot {manifest.id} is sound")
    return took


async def restore_to_path(
    store: ObjectStore,
    manifest: Manifest,
    output: Path,
    *,
    temp_dir: str | None = None,
    progress: ProgressSink | None = None,
    integrity: bool = True,
) -> Path:
    """Write the verified database of a snapshot to ``output`` (which must not exist).

    The file appears under its name only once every check passed (rename from a temp file
    beside it); nothing else is touched.
    """
    sink = progress or NullProgress()
    output = Path(output)
    if output.exists():
        raise SnapshotError(f"{output} already exists: remove it or choose another --output")
    if not output.parent.is_dir():
        raise SnapshotError(f"directory {output.parent} does not exist")
    started = time.monotonic()
    work = work_dir(temp_dir)
    partial = output.with_name(f".{output.name}.partial-{os.getpid()}")
    try:
        await fetch(store, manifest, partial, work, sink, sync=True, integrity=integrity)
        if output.exists():
            raise SnapshotError(f"{output} appeared during the restore; not overwriting it")
        os.replace(partial, output)
    finally:
        with contextlib.suppress(OSError):
            partial.unlink()
        await asyncio.to_thread(shutil.rmtree, work, True)
    took = time.monotonic() - started
    log.info("Snapshot restored %s to %s", manifest.id, output,
             extra={"snapshot_id": manifest.id, "path": str(output), "duration": round(took, 3)})
    sink.finish(f"snapshot {manifest.id} restored to {output}")
    return output
