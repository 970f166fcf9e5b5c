"""The same cases against every snapshot store, each on a real server (see conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from storage_backends import Backend, assert_no_secret

from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageUnavailable
from harmonylite.storage import ObjectStore, SealedStore
from harmonylite.storage.s3 import S3Store
from harmonylite.storage.streaming import Streaming, open_stream

MB = 1024 * 1024


def random_file(path: Path, size: int) -> Path:
    with path.open("wb") as fh:
        left = size
        while left:
            n = min(left, MB)
            fh.write(os.urandom(n))
            left -= n
    return path


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while data := fh.read(MB):
            h.update(data)
    return h.hexdigest()


async def test_round_trip_large_file(store: ObjectStore, tmp_path: Path) -> None:
    src = random_file(tmp_path / "src.db", 5 * MB + 12345)
    digest = sha256_of(src)
    up = await store.upload("snapshots/a.db.zst", src)
    assert up.key == "snapshots/a.db.zst"
    assert up.size == src.stat().st_size
    assert up.sha256 == digest

    dst = tmp_path / "dst.db"
    down = await store.download("snapshots/a.db.zst", dst)
    assert down.size == src.stat().st_size
    assert dst.read_bytes() == src.read_bytes()
    if down.sha256 is not None:
        assert down.sha256 == digest


async def test_bytes_round_trip(store: ObjectStore) -> None:
    data = b'{"format": 1, "id": "x"}'
    info = await store.upload_bytes("snapshots/x.json", data)
    assert info.size == len(data)
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert await store.download_bytes("snapshots/x.json") == data
    empty = await store.upload_bytes("snapshots/empty", b"")
    assert empty.size == 0
    assert await store.download_bytes("snapshots/empty") == b""


async def test_stat(store: ObjectStore, tmp_path: Path) -> None:
    src = random_file(tmp_path / "s", 300_001)
    await store.upload("snapshots/s.db", src)
    info = await store.stat("snapshots/s.db")
    assert info.key == "snapshots/s.db"
    assert info.size == 300_001
    if info.sha256 is not None:
        assert info.sha256 == sha256_of(src)
    with pytest.raises(ObjectNotFound):
        await store.stat("snapshots/missing.db")


async def test_list_with_prefix(store: ObjectStore) -> None:
    assert await store.list("snapshots/") == []
    assert await store.list("") == []
    await store.upload_bytes("snapshots/1.json", b"1")
    await store.upload_bytes("snapshots/2.json", b"22")
    await store.upload_bytes("snapshots/sub/3.json", b"333")
    await store.upload_bytes("other/4.json", b"4444")

    keys = [i.key for i in await store.list("snapshots/")]
    assert sorted(keys) == ["snapshots/1.json", "snapshots/2.json", "snapshots/sub/3.json"]
    sizes = {i.key: i.size for i in await store.list("snapshots/")}
    assert sizes["snapshots/2.json"] == 2
    assert [i.key for i in await store.list("snapshots/2")] == ["snapshots/2.json"]
    assert [i.key for i in await store.list("oth")] == ["other/4.json"]
    assert len(await store.list("")) == 4
    assert await store.list("nothing/") == []
    assert await store.list("snapshots/zzz") == []


async def test_delete(store: ObjectStore) -> None:
    await store.upload_bytes("snapshots/d.json", b"d")
    await store.delete("snapshots/d.json")
    with pytest.raises(ObjectNotFound):
        await store.stat("snapshots/d.json")
    with pytest.raises(ObjectNotFound):
        await store.download_bytes("snapshots/d.json")
    assert await store.list("snapshots/") == []
    await store.delete("snapshots/d.json")  # missing: fine
    await store.delete("snapshots/never-existed.json")


async def test_overwrite(store: ObjectStore, tmp_path: Path) -> None:
    await store.upload_bytes("snapshots/o.json", b"first version")
    await store.upload_bytes("snapshots/o.json", b"second")
    assert await store.download_bytes("snapshots/o.json") == b"second"
    assert (await store.stat("snapshots/o.json")).size == 6
    src = random_file(tmp_path / "o", 2 * MB)
    await store.upload("snapshots/o.json", src)
    dst = tmp_path / "o.out"
    await store.download("snapshots/o.json", dst)
    assert dst.read_bytes() == src.read_bytes()
    assert [i.key for i in await store.list("snapshots/")] == ["snapshots/o.json"]


async def test_download_missing(store: ObjectStore, tmp_path: Path) -> None:
    with pytest.raises(ObjectNotFound) as err:
        await store.download("snapshots/none.db", tmp_path / "none")
    assert err.value.key == "snapshots/none.db"
    with pytest.raises(ObjectNotFound):
        await store.download_bytes("snapshots/none.json")


async def _probe_during(store: ObjectStore, upload: asyncio.Task[object], key: str,
                        allowed_sizes: set[int]) -> int:
    """Poll stat and list until ``upload`` finishes; a partial object must never show."""
    probes = 0
    while not upload.done():
        try:
            info = await store.stat(key)
            assert info.size in allowed_sizes, f"partial object visible: {info.size} bytes"
        except ObjectNotFound:
            assert 0 in allowed_sizes, "the old object vanished during an overwrite"
        for item in await store.list("snapshots/"):
            assert item.key == key, f"unexpected (temp?) name in list(): {item.key}"
            assert item.size in allowed_sizes, f"partial object listed: {item.size} bytes"
        probes += 1
    await upload
    return probes


async def test_upload_is_atomic(backend: Backend, store: ObjectStore, tmp_path: Path) -> None:
    size = 24 * MB
    src = random_file(tmp_path / "big", size)
    key = "snapshots/big.db"
    upload = asyncio.create_task(store.upload(key, src))
    probes = await _probe_during(store, upload, key, {0, size})
    assert probes >= 1
    assert (await store.stat(key)).size == size
    assert [i.key for i in await store.list("snapshots/")] == [key]

    # Overwrite: readers see the old object or the new one, nothing in between.
    src2 = random_file(tmp_path / "big2", size // 2 + 7)
    upload = asyncio.create_task(store.upload(key, src2))
    allowed = {size, size // 2 + 7} | (set() if backend.atomic_overwrite else {0})
    await _probe_during(store, upload, key, allowed)
    dst = tmp_path / "big.out"
    await store.download(key, dst)
    assert sha256_of(dst) == sha256_of(src2)


async def test_wrong_credentials(backend: Backend) -> None:
    if backend.bad_credentials is None:
        pytest.skip(backend.skip_auth_reason)
    opener, secret = backend.bad_credentials
    with pytest.raises(StorageAuthError) as err:
        store = await opener()
        await store.list("snapshots/")
    assert_no_secret(err.value, secret)
    with pytest.raises(StorageAuthError) as err:
        await store.upload_bytes("snapshots/x.json", b"x")
    assert_no_secret(err.value, secret)


async def test_stopped_server(backend: Backend) -> None:
    if backend.stopped is None:
        pytest.skip("covered by test_nats_server_stopped")
    opener, secret = backend.stopped
    with pytest.raises(StorageUnavailable) as err:
        store = await opener()
        await store.list("snapshots/")
    assert_no_secret(err.value, secret)
    with pytest.raises(StorageUnavailable) as err:
        await store.upload_bytes("snapshots/x.json", b"x")
    assert_no_secret(err.value, secret)
    with pytest.raises(StorageUnavailable) as err:
        await store.stat("snapshots/x.json")
    assert_no_secret(err.value, secret)


async def test_stream_reads_the_object(store: ObjectStore, tmp_path: Path) -> None:
    """A store that streams hands out exactly the object, in order, over several parts; one
    that cannot returns None (the restore then downloads)."""
    inner = store.inner if isinstance(store, SealedStore) else store
    if isinstance(inner, S3Store):
        inner.part_bytes = MB  # several ranged GETs in flight, reassembled in order
    src = random_file(tmp_path / "src.db", 5 * MB + 12345)
    await store.upload("snapshots/s.db.zst", src)
    stream = await open_stream(store, "snapshots/s.db.zst")
    if stream is None:
        assert not isinstance(inner, Streaming)
        return
    try:
        assert stream.size == src.stat().st_size
        parts = []
        while data := await asyncio.to_thread(stream.read, 300_000):
            parts.append(data)
        assert b"".join(parts) == src.read_bytes()
        assert await asyncio.to_thread(stream.read, 1) == b""
    finally:
        stream.close()
        stream.close()
    with pytest.raises(ObjectNotFound):
        await open_stream(store, "snapshots/missing.db.zst")
