"""The snapshot pipeline end to end, on real SQLite files and real stores."""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import sqlite3
import subprocess
import threading
from pathlib import Path

import nats
import pytest
from snapshot_helpers import (
    SEQS,
    fill,
    make_cfg,
    make_db,
    rows_of,
    tmpfs,
    with_snapshot,
    work_dirs,
)

from harmonylite.bus.names import namespace
from harmonylite.cdc.install import harmonylite_objects
from harmonylite.cdc.schema import schema_hash
from harmonylite.config import Config
from harmonylite.errors import LeaseLost, NoSpaceError, SnapshotBusy, StorageError
from harmonylite.restore.verify import restore_to_path, verify_snapshot
from harmonylite.snapshot import pipeline as pipeline_module
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage import ObjectStore, open_store
from servers import NatsServer


async def _store(cfg: Config) -> ObjectStore:
    return await open_store(cfg.snapshot)


def _keys(store_dir: Path) -> list[str]:
    return sorted(p.name for p in (store_dir / "snapshots").glob("*")) if (
        store_dir / "snapshots").is_dir() else []


@pytest.mark.parametrize("compress", [True, False])
async def test_snapshot_is_sanitized_and_restores(tmp_path: Path, compress: bool) -> None:
    db = tmp_path / "app.db"
    conn = make_db(db, rows=3000)
    pending = conn.execute("SELECT count(*) FROM __harmonylite__log").fetchone()[0]
    assert pending > 0  # change-log rows are waiting in the source
    temp = tmp_path / "tmp"
    temp.mkdir()
    cfg = make_cfg(db, tmp_path / "store", temp_dir=temp, compress=compress)
    store = await _store(cfg)
    result = await SnapshotPipeline(cfg, store).save()
    m = result.manifest
    assert m.sequences == SEQS
    assert m.tables == ['odd "name"', "items"] or m.tables == sorted(['odd "name"', "items"])
    assert m.schema_hash == schema_hash(conn)
    assert m.compression == ("zstd" if compress else "none")
    assert _keys(tmp_path / "store") == sorted([Path(m.data_key).name, f"{m.id}.json"])
    assert work_dirs(temp) == []

    out = tmp_path / "restored.db"
    await restore_to_path(store, m, out)
    check = sqlite3.connect(str(out))
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert harmonylite_objects(check) == []
        assert check.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    finally:
        check.close()
    assert rows_of(out) == rows_of(db)
    assert out.stat().st_size == m.db_bytes
    conn.close()


async def test_writers_keep_writing_during_capture(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db, rows=20000, blob=200).close()
    cfg = make_cfg(db, tmp_path / "store")
    stop = threading.Event()
    first = threading.Event()
    written: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        w = sqlite3.connect(str(db), isolation_level=None)
        w.execute("PRAGMA busy_timeout = 10000")
        try:
            while not stop.is_set():
                cur = w.execute("INSERT INTO items(name) VALUES ('live')")
                written.append(int(cur.lastrowid or 0))
                first.set()
        except BaseException as exc:
            errors.append(exc)
            first.set()
        finally:
            w.close()

    t = threading.Thread(target=writer)
    t.start()
    await asyncio.to_thread(first.wait)
    before = len(written)
    try:
        result = await SnapshotPipeline(cfg, await _store(cfg)).save()
    finally:
        stop.set()
        await asyncio.to_thread(t.join)
    assert errors == []
    assert len(written) > before  # commits went on while the copy was taken
    out = tmp_path / "restored.db"
    await restore_to_path(await _store(cfg), result.manifest, out)
    items, _ = rows_of(out)
    ids = [r[0] for r in items]
    assert ids == list(range(1, len(ids) + 1))  # a consistent prefix of the writer's commits
    assert 20000 + before <= len(ids) <= 20000 + len(written)


async def test_two_captures_at_once_one_is_busy(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "app.db"
    make_db(db).close()
    cfg = make_cfg(db, tmp_path / "store")
    store = await _store(cfg)
    results = await asyncio.gather(SnapshotPipeline(cfg, store).save(),
                                   SnapshotPipeline(cfg, store).save(), return_exceptions=True)
    busy = [r for r in results if isinstance(r, SnapshotBusy)]
    assert len(busy) == 1
    assert "system busy capturing snapshot" in str(busy[0])
    assert "system busy capturing snapshot" in caplog.text
    assert len(await list_snapshots(store)) == 1
    # The lock is released afterwards.
    await SnapshotPipeline(cfg, store).save()
    assert len(await list_snapshots(store)) == 2


async def test_keep_prunes_oldest(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = make_db(db, rows=50)
    cfg = make_cfg(db, tmp_path / "store", keep=2)
    store = await _store(cfg)
    ids = []
    for i in range(4):
        conn.execute("INSERT INTO items(name) VALUES (?)", (f"round-{i}",))
        ids.append((await SnapshotPipeline(cfg, store).save()).manifest.id)
    conn.close()
    listed = [m.id for m in await list_snapshots(store)]
    assert listed == [ids[3], ids[2]]
    assert len(_keys(tmp_path / "store")) == 4  # two data objects, two manifests


async def test_full_temp_dir_raises_no_space(tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "app.db"
    make_db(db, rows=3000, blob=1000).close()  # a few MB, more than the tmpfs holds
    with tmpfs(tmp_path / "small", "2m") as small:
        cfg = make_cfg(db, tmp_path / "store", temp_dir=small)
        with pytest.raises(NoSpaceError) as info:
            await SnapshotPipeline(cfg, await _store(cfg)).save()
        assert "no space left on device" in str(info.value)
        assert info.value.needed > info.value.free
        assert work_dirs(small) == []
    assert "no space left on device" in caplog.text
    assert _keys(tmp_path / "store") == []


class _DiskFillsUp(SnapshotPipeline):
    """Another process fills the temp filesystem right after the free-space check passed."""

    def check_free_space(self, work: Path, needed: int) -> None:
        super().check_free_space(work, needed)
        fill(work.parent, leave=64 * 1024)


async def test_enospc_during_vacuum_into_aborts_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db, rows=3000, blob=1000).close()
    with tmpfs(tmp_path / "small", "32m") as small:
        cfg = make_cfg(db, tmp_path / "store", temp_dir=small)
        with pytest.raises(NoSpaceError) as info:
            await _DiskFillsUp(cfg, await _store(cfg)).save()
        assert "no space left on device" in str(info.value)
        assert work_dirs(small) == []
    assert _keys(tmp_path / "store") == []


async def test_store_failing_mid_upload_commits_nothing(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    db = tmp_path / "app.db"
    conn = make_db(db, rows=100)
    temp = tmp_path / "tmp"
    temp.mkdir()
    with tmpfs(tmp_path / "store", "1m") as store_dir:
        cfg = make_cfg(db, store_dir, temp_dir=temp)
        store = await _store(cfg)
        first = (await SnapshotPipeline(cfg, store).save()).manifest
        before = _keys(store_dir)
        # Incompressible rows: the next snapshot no longer fits in the store.
        conn.execute("BEGIN")
        for _ in range(300):
            conn.execute("INSERT INTO items(name, data) VALUES ('big', randomblob(8192))")
        conn.execute("COMMIT")
        caplog.clear()
        with caplog.at_level(logging.INFO), pytest.raises(StorageError):
            await SnapshotPipeline(cfg, store).save()
        assert "Upload failed" in caplog.text
        assert "Snapshot saved" not in caplog.text
        assert _keys(store_dir) == before
        assert [m.id for m in await list_snapshots(store)] == [first.id]
        await verify_snapshot(store, first)
    assert work_dirs(temp) == []
    conn.close()


async def test_lost_lease_before_commit_leaves_no_orphan(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db).close()
    cfg = make_cfg(db, tmp_path / "store")
    store = await _store(cfg)
    fenced = []

    async def fence() -> None:
        fenced.append(_keys(tmp_path / "store"))
        raise LeaseLost("snapshot lease taken over by node 9")

    with pytest.raises(LeaseLost):
        await SnapshotPipeline(cfg, store).save(fence)
    assert len(fenced) == 1 and len(fenced[0]) == 1  # the data object was there at the fence
    assert _keys(tmp_path / "store") == []
    assert await list_snapshots(store) == []


async def test_missing_database_is_an_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path / "nope.db", tmp_path / "store", temp_dir=tmp_path)
    with pytest.raises(Exception, match="does not exist"):
        await SnapshotPipeline(cfg, await _store(cfg)).save()
    assert work_dirs(tmp_path) == []


async def test_uncompressed_config_change_keeps_listing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db).close()
    cfg = make_cfg(db, tmp_path / "store")
    store = await _store(cfg)
    a = (await SnapshotPipeline(cfg, store).save()).manifest
    b = (await SnapshotPipeline(with_snapshot(cfg, compress=False), store).save()).manifest
    assert [m.id for m in await list_snapshots(store)] == [b.id, a.id]
    assert b.data_key.endswith(".db") and a.data_key.endswith(".db.zst")
    for m in (a, b):
        await verify_snapshot(store, m)


class _PinnedWorkDir(SnapshotPipeline):
    """Something holds the work dir: a filesystem mounted inside it makes removal fail (EBUSY)."""

    pinned: Path | None = None

    def check_free_space(self, work: Path, needed: int) -> None:
        super().check_free_space(work, needed)
        (work / "pinned").mkdir()
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                              str(work / "pinned")], capture_output=True, text=True)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip()}")
        self.pinned = work / "pinned"


async def test_cleanup_failure_is_logged_with_the_path(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pipeline_module, "CLEANUP_DELAY_SECONDS", 0.0)
    db = tmp_path / "app.db"
    make_db(db).close()
    temp = tmp_path / "tmp"
    temp.mkdir()
    cfg = make_cfg(db, tmp_path / "store", temp_dir=temp)
    p = _PinnedWorkDir(cfg, await _store(cfg))
    try:
        result = await p.save()  # the snapshot itself is committed
        assert p.pinned is not None
        assert "Unable to cleanup temp path" in caplog.text
        assert str(p.pinned.parent) in caplog.text
        assert [m.id for m in await list_snapshots(p.store)] == [result.manifest.id]
    finally:
        if p.pinned is not None:
            await asyncio.to_thread(subprocess.run, ["umount", "-l", str(p.pinned)], check=False)
    if p.pinned is not None:
        shutil.rmtree(p.pinned.parent)
    assert work_dirs(temp) == []


async def test_cancelled_save_leaves_nothing(tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    make_db(db).close()
    temp = tmp_path / "tmp"
    temp.mkdir()
    cfg = make_cfg(db, tmp_path / "store", temp_dir=temp)
    store = await _store(cfg)

    async def fence() -> None:  # the node shuts down right before the commit
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await asyncio.sleep(0)

    with pytest.raises(asyncio.CancelledError):
        await SnapshotPipeline(cfg, store).save(fence)
    assert _keys(tmp_path / "store") == []
    assert work_dirs(temp) == []
    await SnapshotPipeline(cfg, store).save()  # the capture lock was released


class _KillOnUpload:
    """A progress sink that SIGKILLs the store's server as the upload starts."""

    def __init__(self, server: NatsServer) -> None:
        self.server = server

    def stage(self, name: str, total: int | None = None) -> None:
        if name == "upload":
            self.server.stop(signal.SIGKILL)

    def advance(self, nbytes: int) -> None:
        return None

    def finish(self, message: str) -> None:
        return None


async def test_store_killed_mid_upload_keeps_old_snapshots(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "app.db"
    conn = make_db(db, rows=100)
    temp = tmp_path / "tmp"
    temp.mkdir()
    cfg = make_cfg(db, tmp_path / "unused", temp_dir=temp, store="nats", compress=False)
    url = nats_server.url

    async def nats_store() -> tuple[nats.aio.client.Client, ObjectStore]:
        nc = await nats.connect(url, max_reconnect_attempts=2, reconnect_time_wait=0.2)
        return nc, await open_store(cfg.snapshot, js=nc.jetstream(),
                                    bucket=namespace(cfg).snapshot_bucket)

    nc, store = await nats_store()
    first = (await SnapshotPipeline(cfg, store).save()).manifest
    conn.execute("BEGIN")
    for _ in range(4000):  # ~32 MB of incompressible rows: the upload takes a while
        conn.execute("INSERT INTO items(name, data) VALUES ('big', randomblob(8192))")
    conn.execute("COMMIT")
    caplog.clear()
    with caplog.at_level(logging.INFO), pytest.raises(StorageError):
        await SnapshotPipeline(cfg, store, progress=_KillOnUpload(nats_server)).save()
    assert "Upload failed" in caplog.text and "Snapshot saved" not in caplog.text
    assert work_dirs(temp) == []
    await nc.close()
    nats_server.start()
    nc, store = await nats_store()
    assert [m.id for m in await list_snapshots(store)] == [first.id]
    await verify_snapshot(store, first)
    keys = sorted(o.key for o in await store.list("snapshots/"))
    assert keys == sorted([f"snapshots/{first.id}.db", f"snapshots/{first.id}.json"])
    await store.aclose()
    await nc.close()
    conn.close()
