"""Manifest: ids, keys, JSON, listing, lookup and retention (on a real file store)."""

from __future__ import annotations

import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from harmonylite.errors import SnapshotError
from harmonylite.snapshot.manifest import (
    Manifest,
    data_key,
    find_snapshot,
    is_snapshot_id,
    list_snapshots,
    manifest_key,
    new_snapshot_id,
    prune,
    rfc3339,
    snapshot_id_of_key,
)
from harmonylite.storage.file import FileStore

T0 = datetime(2024, 5, 17, 8, 30, 0, tzinfo=UTC)


def _manifest(when: datetime, node_id: int = 3, compression: str = "zstd",
              seqs: dict[str, int] | None = None) -> Manifest:
    seqs = {"s-1": 5} if seqs is None else seqs
    return Manifest(
        id=new_snapshot_id(node_id, when, seqs), node_id=node_id, created_at=rfc3339(when),
        db_bytes=4096, db_sha256="a" * 64, stored_bytes=100, stored_sha256="b" * 64,
        compression=compression, sequences=seqs, schema_hash="c" * 64, tables=["t"],
    )


def test_id_format_and_order() -> None:
    sid = new_snapshot_id(42, T0, {"s-1": 7, "s-2": 5})
    assert sid.startswith("p000000000000012-20240517T083000Z-42-")
    assert is_snapshot_id(sid)
    assert len(sid.rsplit("-", 1)[1]) == 8
    assert new_snapshot_id(42, T0, {"s-1": 7, "s-2": 5}) != sid  # random suffix
    # Ids sort by position in the streams, whatever the clock said.
    further = new_snapshot_id(42, T0 - timedelta(days=1), {"s-1": 8, "s-2": 5})
    assert sorted([further, sid]) == [sid, further]
    # Ids of the older, time-first form stay readable and sort before every new one.
    assert is_snapshot_id("20240517T083000Z-42-0a1b2c3d")
    assert sorted([sid, "20240517T083000Z-42-0a1b2c3d"])[0] == "20240517T083000Z-42-0a1b2c3d"
    assert not is_snapshot_id("latest")
    assert not is_snapshot_id("20240517T083000Z-42-XYZ")


async def test_newest_is_the_furthest_in_the_streams_not_the_latest_clock(tmp_path: Path
                                                                          ) -> None:
    store = FileStore(tmp_path)
    ahead = _manifest(T0, seqs={"s-1": 50})
    future = _manifest(T0 + timedelta(minutes=10), seqs={"s-1": 20})  # a node with a fast clock
    for m in (future, ahead):
        await _commit(store, m)
    assert [m.id for m in await list_snapshots(store)] == [ahead.id, future.id]
    assert await prune(store, keep=1) == [future.id]


async def test_a_manifest_naming_another_id_is_refused(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    real = _manifest(T0)
    await _commit(store, real)
    impostor = new_snapshot_id(3, T0)
    await store.upload_bytes(manifest_key(impostor), real.to_json())
    with pytest.raises(SnapshotError, match=f"names snapshot {real.id}"):
        await find_snapshot(store, impostor)


def test_keys() -> None:
    sid = new_snapshot_id(1, T0)
    assert data_key(sid, "zstd") == f"snapshots/{sid}.db.zst"
    assert data_key(sid, "none") == f"snapshots/{sid}.db"
    assert manifest_key(sid) == f"snapshots/{sid}.json"
    for key in (data_key(sid, "zstd"), data_key(sid, "none"), manifest_key(sid)):
        assert snapshot_id_of_key(key) == sid
    assert snapshot_id_of_key("snapshots/notes.txt") is None
    assert snapshot_id_of_key(f"other/{sid}.json") is None


def test_json_round_trip_has_contract_keys() -> None:
    m = _manifest(T0)
    raw = m.to_json()
    data = json.loads(raw)
    assert set(data) == {"format", "id", "node_id", "created_at", "db_bytes", "db_sha256",
                         "stored_bytes", "stored_sha256", "compression", "sequences",
                         "schema_hash", "tables", "version"}
    assert data["format"] == 1
    assert data["created_at"] == "2024-05-17T08:30:00.000000Z"
    assert Manifest.from_json(raw) == m
    data["unknown_future_key"] = 1
    assert Manifest.from_json(json.dumps(data)) == m


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": 2}, "format"),
        ({"compression": "gzip"}, "compression"),
        ({"id": "nope"}, "invalid snapshot id"),
        ({"db_bytes": "many"}, "malformed"),
    ],
)
def test_bad_manifests_are_rejected(change: dict[str, object], message: str) -> None:
    data = _manifest(T0).to_dict() | change
    with pytest.raises(SnapshotError, match=message):
        Manifest.from_json(json.dumps(data))


def test_not_json() -> None:
    with pytest.raises(SnapshotError, match="not JSON"):
        Manifest.from_json(b"{")
    with pytest.raises(SnapshotError, match="not a JSON object"):
        Manifest.from_json(b"[]")
    data = _manifest(T0).to_dict()
    del data["db_sha256"]
    with pytest.raises(SnapshotError, match="malformed"):
        Manifest.from_json(json.dumps(data))


async def _commit(store: FileStore, m: Manifest) -> None:
    await store.upload_bytes(m.data_key, b"x" * m.stored_bytes)
    await store.upload_bytes(m.manifest_key, m.to_json())


async def test_listing_reads_manifests_only(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    assert await list_snapshots(store) == []
    a, b = _manifest(T0), _manifest(T0 + timedelta(minutes=5))
    same_second = _manifest(T0 + timedelta(minutes=5, microseconds=10))
    for m in (b, a, same_second):
        await _commit(store, m)
    orphan = _manifest(T0 + timedelta(hours=1))
    await store.upload_bytes(orphan.data_key, b"data without manifest")
    await store.upload_bytes(manifest_key(new_snapshot_id(3, T0)), b"garbage")
    listed = await list_snapshots(store)
    assert [m.id for m in listed] == [same_second.id, b.id, a.id]
    assert (await find_snapshot(store, "latest")).id == same_second.id
    assert (await find_snapshot(store, a.id)) == a
    with pytest.raises(SnapshotError, match="no committed snapshot"):
        await find_snapshot(store, orphan.id)
    with pytest.raises(SnapshotError, match="invalid snapshot id"):
        await find_snapshot(store, "../etc/passwd")
    with pytest.raises(SnapshotError, match="no committed snapshot"):
        await find_snapshot(FileStore(tmp_path / "empty"), "latest")


async def test_prune_deletes_oldest_and_old_orphans(tmp_path: Path) -> None:
    store = FileStore(tmp_path)
    ms = [_manifest(T0 + timedelta(minutes=i)) for i in range(5)]
    for m in ms:
        await _commit(store, m)
    old_orphan = _manifest(T0 - timedelta(days=1))
    new_orphan = _manifest(T0 + timedelta(hours=1))  # an upload that may still be committing
    for o in (old_orphan, new_orphan):
        await store.upload_bytes(o.data_key, b"partial")
    # Leftovers are judged by the store's own clock (not by the time in an id, which is a
    # node's clock): the old one was stored two hours before the kept manifests.
    stale = time.time() - 7200
    os.utime(tmp_path / old_orphan.data_key, (stale, stale))
    removed = await prune(store, keep=2)
    assert removed == [ms[0].id, ms[1].id, ms[2].id]
    assert [m.id for m in await list_snapshots(store)] == [ms[4].id, ms[3].id]
    keys = {i.key for i in await store.list("snapshots/")}
    assert old_orphan.data_key not in keys
    assert new_orphan.data_key in keys
    assert {m.data_key for m in ms[3:]} <= keys
    assert await prune(store, keep=2) == []
