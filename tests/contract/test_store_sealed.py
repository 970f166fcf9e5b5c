"""The sealing wrapper over every snapshot store, each on a real server (see conftest.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest
from storage_backends import Backend

from harmonylite.age_keys import Keys, load_identities, new_identity
from harmonylite.errors import ObjectNotFound, SealError
from harmonylite.storage import ObjectStore, SealedStore
from harmonylite.storage.sealed import MAGIC, seal_key
from harmonylite.storage.streaming import Streaming, open_stream

MB = 1024 * 1024


def _inner(store: ObjectStore) -> ObjectStore:
    assert isinstance(store, SealedStore)  # open_store wraps every backend
    return store.inner


async def test_sealed_round_trip(backend: Backend, tmp_path: Path) -> None:
    secret, public = new_identity()
    ids = tmp_path / "id.txt"
    ids.write_text(secret + "\n")
    inner = _inner(await backend.open())
    store = SealedStore(inner, Keys((public,), load_identities(str(ids)), str(ids)))
    src = tmp_path / "src.db.zst"
    src.write_bytes(os.urandom(3 * MB + 5))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    key = "snapshots/a.db.zst"

    up = await store.upload(key, src)
    assert (up.size, up.sha256) == (src.stat().st_size, digest)
    raw = tmp_path / "raw"
    await inner.download(key, raw)
    assert raw.read_bytes().startswith(MAGIC) and raw.stat().st_size > up.size
    st = await store.stat(key)
    assert (st.size, st.sha256 or digest) == (up.size, digest)
    assert sorted(i.key for i in await inner.list("snapshots/")) == [key, seal_key(key)]
    assert [i.key for i in await store.list("snapshots/")] == [key]
    out = tmp_path / "out"
    await store.download(key, out)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest

    await store.upload_bytes("archive/seg-1", b"rows")
    await store.upload_bytes("archive/seg-1.json", b"{}")
    assert (await inner.download_bytes("archive/seg-1")).startswith(MAGIC)
    assert await inner.download_bytes("archive/seg-1.json") == b"{}"
    assert await store.download_bytes("archive/seg-1") == b"rows"

    # A node without the identity (a plain open_store) names the object and the recipient.
    plain = await backend.open()
    with pytest.raises(SealError) as err:
        await plain.download_bytes("archive/seg-1")
    assert "archive/seg-1" in str(err.value) and public in str(err.value)

    await store.delete(key)
    with pytest.raises(ObjectNotFound):
        await inner.stat(seal_key(key))
    assert [i.key for i in await inner.list("snapshots/")] == []


async def test_sealed_object_is_not_streamed(backend: Backend, tmp_path: Path) -> None:
    """A restore streams plain objects only: a sealed one goes through download, which opens it
    (and a plain object beside it still streams, whatever this node's own setting)."""
    secret, public = new_identity()
    ids = tmp_path / "id.txt"
    ids.write_text(secret + "\n")
    inner = _inner(await backend.open())
    sealing = SealedStore(inner, Keys((public,), load_identities(str(ids)), str(ids)))
    src = tmp_path / "src.db.zst"
    src.write_bytes(os.urandom(MB + 7))
    await sealing.upload("snapshots/sealed.db.zst", src)
    await inner.upload("snapshots/plain.db.zst", src)
    assert await open_stream(sealing, "snapshots/sealed.db.zst") is None
    stream = await open_stream(sealing, "snapshots/plain.db.zst")
    if stream is None:  # this backend does not stream at all
        assert not isinstance(inner, Streaming)
        return
    try:
        data = b""
        while chunk := await asyncio.to_thread(stream.read, 100_000):
            data += chunk
    finally:
        stream.close()
    assert data == src.read_bytes()
