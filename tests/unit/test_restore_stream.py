"""A restore reads the stored object as a stream and checks it before anything is installed:
a stream cut short, corrupted or broken by the store leaves no database behind."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import shutil
import sqlite3
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard

from harmonylite.cdc.install import install
from harmonylite.config import parse_config
from harmonylite.errors import StorageUnavailable, VerificationError
from harmonylite.restore.verify import restore_to_path, verify_snapshot
from harmonylite.snapshot.manifest import Manifest
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage.base import ObjectInfo
from harmonylite.storage.file import FileStore
from harmonylite.storage.streaming import ObjectStream, PartStream

PART = 64 * 1024
Fault = Callable[[int, bytes], bytes]


class PartsStore(FileStore):
    """A directory read in small ranges, as the S3 store reads (several in flight), with a hook
    that changes what one range returns; ``download`` is not there to fall back on."""

    fault: Fault | None = None

    async def open_stream(self, key: str) -> ObjectStream:
        path = self._path(key)
        data = path.read_bytes()

        def fetch(offset: int, length: int) -> bytes:
            part = data[offset:offset + length]
            return self.fault(offset, part) if self.fault else part

        return PartStream(len(data), fetch, part_bytes=PART, ahead=3)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        raise AssertionError("a streaming store is not downloaded into a temp file")


Saved = tuple[PartsStore, Manifest]


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Manifest]:
    """One snapshot for the module (saving one takes seconds on a busy machine)."""
    base = tmp_path_factory.mktemp("stream-template")
    db = base / "app.db"
    conn = sqlite3.connect(str(db), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB)")
    install(conn)
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(os.urandom(600),) for _ in range(2000)])
    conn.close()
    cfg, _ = parse_config({"db_path": str(db), "node_id": 3, "snapshot": {
        "store": "file", "file": {"path": str(base / "store")}}})
    manifest = asyncio.run(SnapshotPipeline(cfg, FileStore(base / "store")).save()).manifest
    assert manifest.stored_bytes > 4 * PART  # several ranges
    return base / "store", manifest


@pytest.fixture
def saved(template: tuple[Path, Manifest], tmp_path: Path) -> Saved:
    root, manifest = template
    shutil.copytree(root, tmp_path / "store")
    return PartsStore(tmp_path / "store"), manifest


def _leftovers(tmp_path: Path) -> list[str]:
    return [n for n in os.listdir(tmp_path) if n.startswith((".out.db", "out.db"))]


async def test_streamed_restore_is_the_snapshot(saved: Saved, tmp_path: Path) -> None:
    store, m = saved
    out = await restore_to_path(store, m, tmp_path / "out.db", temp_dir=str(tmp_path))
    assert hashlib.sha256(out.read_bytes()).hexdigest() == m.db_sha256
    assert [n for n in os.listdir(tmp_path) if n.startswith("harmonylite-snapshot-")] == []


async def test_stream_cut_short_is_refused(saved: Saved, tmp_path: Path) -> None:
    store, m = saved
    store.fault = lambda offset, part: part[:100] if offset == 2 * PART else part
    with pytest.raises(VerificationError) as info:
        await restore_to_path(store, m, tmp_path / "out.db")
    assert info.value.check == "size"
    assert _leftovers(tmp_path) == []


async def test_corrupted_range_is_refused(saved: Saved, tmp_path: Path) -> None:
    store, m = saved

    def flip(offset: int, part: bytes) -> bytes:
        if offset != 3 * PART:
            return part
        raw = bytearray(part)
        raw[77] ^= 0x01
        return bytes(raw)

    store.fault = flip
    with pytest.raises(VerificationError) as info:
        await restore_to_path(store, m, tmp_path / "out.db")
    assert info.value.check == "sha256"
    assert _leftovers(tmp_path) == []
    with pytest.raises(VerificationError):
        await verify_snapshot(store, m)


async def test_store_failing_mid_stream_leaves_nothing(saved: Saved, tmp_path: Path) -> None:
    store, m = saved

    def fail(offset: int, part: bytes) -> bytes:
        if offset == 2 * PART:
            raise StorageUnavailable("connection reset mid-object")
        return part

    store.fault = fail
    with pytest.raises(StorageUnavailable):
        await restore_to_path(store, m, tmp_path / "out.db", temp_dir=str(tmp_path))
    assert _leftovers(tmp_path) == []
    assert [n for n in os.listdir(tmp_path) if n.startswith("harmonylite-snapshot-")] == []


async def test_zeroed_pages_expand_in_bounded_chunks(saved: Saved, tmp_path: Path) -> None:
    """A run of zeroed pages (the freed change log) compresses a thousandfold: decompressing
    it must not hold the expanded run in memory at once."""
    _, m = saved
    store = FileStore(tmp_path / "store")
    db = bytes(48 * 1024 * 1024)
    data = zstandard.ZstdCompressor(level=3).compress(db)
    await store.upload_bytes(m.data_key, data)
    zeros = dataclasses.replace(m, stored_bytes=len(data),
                                stored_sha256=hashlib.sha256(data).hexdigest(),
                                db_bytes=len(db), db_sha256=hashlib.sha256(db).hexdigest())
    del db
    tracemalloc.start()
    try:
        out = await restore_to_path(store, zeros, tmp_path / "out.db", integrity=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.stat().st_size == zeros.db_bytes
    assert peak < 16 * 1024 * 1024, f"peak {peak / 1e6:.1f} MB"


def test_write_failure_reaches_the_decompressing_loop() -> None:
    """The database is hashed and written on a worker thread: a failed write (a full disk)
    must still stop the restore with its own error, not hang or pass unnoticed."""
    import errno
    import io

    from harmonylite.restore.verify import _DbWriter

    class FullDisk(io.BytesIO):
        def write(self, data: bytes, /) -> int:  # type: ignore[override]
            if self.tell() >= 3 * PART:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    chunk = os.urandom(PART)
    with pytest.raises(OSError) as info, _DbWriter(FullDisk(), depth=2) as out:
        for _ in range(64):
            out.write(chunk)
    assert info.value.errno == errno.ENOSPC
