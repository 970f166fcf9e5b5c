"""A point-in-time restore from a snapshot taken on a node that was writing: such a snapshot
holds that node's changes not in the streams yet, which belong to a later point. Real nats-server,
real node processes, the archive in a directory."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harmonylite.archive import catalog
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.storage.file import FileStore
from nodes import NodeProc, health, wait_until
from servers import NatsServer, free_port

STREAMS = ["harmonylite-changes-c-1", "harmonylite-changes-c-2"]


def _commit(node: NodeProc, j: int) -> None:
    """Transaction j: four items (both shards) and the node's ``last`` row."""
    conn = sqlite3.connect(node.db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO items VALUES (?, ?)", [(f"{j}-{i}", j) for i in range(4)])
        conn.execute("INSERT INTO last VALUES (1, ?) ON CONFLICT(id) DO UPDATE SET "
                     "txn = excluded.txn", (j,))
        conn.execute("COMMIT")
    finally:
        conn.close()


def _archived(store: Path) -> dict[str, int]:
    async def read() -> dict[str, int]:
        archives = await catalog.list_archive(FileStore(str(store)), STREAMS)
        return {s: a.last for s, a in archives.items()}
    return asyncio.run(read())


def _streams(node: NodeProc) -> dict[str, Any]:
    return dict(health(node)[1].get("replication", {}))


def _all_out(node: NodeProc, store: Path) -> bool:
    """Every local change published, applied back, and archived."""
    streams = _streams(node)
    heads = {s: int(streams.get(s, {}).get("stream_last_sequence", -1)) for s in STREAMS}
    applied = {s: int(streams.get(s, {}).get("applied_sequence", -2)) for s in STREAMS}
    pending = node.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                         "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0]
    return pending == 0 and heads == applied and _archived(store) == heads


def test_a_snapshot_holding_unsent_local_changes_serves_no_earlier_point(
        tmp_path: Path, nats_server: NatsServer) -> None:
    store = tmp_path / "store"
    cfg = {"nats": {"urls": [nats_server.url]}, "replication_log": {"shards": 2},
           "snapshot": {"store": "file", "file": {"path": str(store)}, "interval": 0,
                        "leader_ttl": 3000, "archive": True, "archive_interval": 200},
           "health_check": {"enable": True, "bind": f"127.0.0.1:{free_port()}"}}
    node = NodeProc(tmp_path / "n1", 1, cfg)
    node.execute("CREATE TABLE items(id TEXT PRIMARY KEY, txn INTEGER)")
    node.execute("CREATE TABLE last(id INTEGER PRIMARY KEY, txn INTEGER)")
    try:
        node.start()
        wait_until(lambda: health(node)[1].get("archive", {}).get("writing"), 60,
                   "the archive writer")
        first = node.cli("snapshot", "save")  # where the restorable window begins
        assert first.returncode == 0, first.stderr
        for j in (1, 2, 3):
            _commit(node, j)
        wait_until(lambda: _all_out(node, store), 60, "transactions 1-3 archived")
        point = _archived(store)  # the streams right after transaction 3
        node.stop()
        after_three = time.time()
        _commit(node, 4)  # written while the node is stopped: not in any stream yet
        saved = node.cli("snapshot", "save")
        assert saved.returncode == 0, saved.stderr
        snaps = asyncio.run(list_snapshots(FileStore(str(store))))
        assert snaps[0].sequences == point  # it claims no more than transaction 3's messages
        node.start()
        wait_until(lambda: _all_out(node, store), 60, "transaction 4 archived")
        after_four = time.time()
        _commit(node, 5)
        wait_until(lambda: _all_out(node, store), 60, "transaction 5 archived")
        # Right after transaction 3: the snapshot just saved is at that point by its positions,
        # yet holds transaction 4, which the streams carry only later.
        assert _restored(node, tmp_path / "at-3.db", after_three) == (3, 3)
        assert _restored(node, tmp_path / "at-4.db", after_four) == (4, 4)
    finally:
        node.stop()


def _restored(node: NodeProc, out: Path, t: float) -> tuple[int, int]:
    """Restore to ``t``: the ``last`` row's transaction, and how many whole transactions of
    items (asserting they are exactly 1..n)."""
    when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    done = node.cli("snapshot", "restore", "--to-time", when, "--output", str(out))
    assert done.returncode == 0, done.stderr
    conn = sqlite3.connect(out)
    try:
        last = conn.execute("SELECT txn FROM last").fetchall()
        items = sorted(r[0] for r in conn.execute("SELECT id FROM items"))
    finally:
        conn.close()
    n = len(items) // 4
    assert items == sorted(f"{j}-{i}" for j in range(1, n + 1) for i in range(4)), items
    assert len(last) == 1, last
    return int(last[0][0]), n
