"""Recovery and provisioning from snapshots, with real nodes, a real nats-server and a file store.

Snapshots are taken on demand (``snapshot save``); the nodes' own schedule is off (interval 0).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

STREAM = "harmonylite-changes-c-1"
SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)"
PAUSE_ENV = "HARMONYLITE_TEST_PAUSE_INSTALL"


def node_cfg(server: NatsServer, store: Path, max_entries: int = 50) -> dict[str, Any]:
    return {
        "nats": {"urls": [server.url], "connect_retries": 0, "reconnect_wait_seconds": 1},
        "replication_log": {"shards": 1, "max_entries": max_entries},
        "logging": {"verbose": True},
        "snapshot": {"enabled": True, "store": "file", "file": {"path": str(store)},
                     "interval": 0, "leader_ttl": 3_600_000},
    }


def stream_state(server: NatsServer) -> tuple[int, int, int]:
    """(first_seq, last_seq, messages) of the test stream."""

    async def get() -> tuple[int, int, int]:
        nc = await nats.connect(server.url)
        try:
            st = (await nc.jetstream().stream_info(STREAM)).state
            return st.first_seq, st.last_seq, st.messages
        finally:
            await nc.close()

    return asyncio.run(get())


def cli(node: NodeProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(node.config_path),
                           "snapshot", *args], capture_output=True, text=True, timeout=120)


def save_snapshot(node: NodeProc) -> str:
    """``snapshot save`` as an operator runs it. Exit 75 says the snapshot leader is capturing one
    of its own (its message-count trigger still runs with the interval off): save again."""
    runs: list[subprocess.CompletedProcess[str]] = []

    def answered() -> bool:
        runs.append(cli(node, "save"))
        return runs[-1].returncode != 75

    wait_until(answered, 60, "snapshot save to find no capture running")
    res = runs[-1]
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def manifest(store: Path, snapshot_id: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((store / "snapshots" / f"{snapshot_id}.json").read_text())
    return data


def position(node: NodeProc) -> int:
    rows = node.query("SELECT seq FROM __harmonylite__seq WHERE stream = ?", (STREAM,))
    return int(rows[0][0]) if rows else 0


def items(node: NodeProc) -> list[tuple[Any, ...]]:
    return node.query("SELECT id, v FROM items ORDER BY id")


def write(node: NodeProc, ids: range) -> None:
    conn = node.connect()
    try:
        for i in ids:
            conn.execute("INSERT INTO items VALUES (?, ?)", (i, f"row {i}"))
    finally:
        conn.close()


def db_digest(path: Path) -> str:
    """Hash of the database and its WAL, as files."""
    h = hashlib.sha256()
    for p in (path, Path(f"{path}-wal")):
        h.update(p.read_bytes() if p.exists() else b"-")
    return h.hexdigest()


def log_after(node: NodeProc, mark: int) -> str:
    return node.log_text()[mark:]


class Cluster:
    def __init__(self, tmp_path: Path, server: NatsServer) -> None:
        self.tmp = tmp_path
        self.server = server
        self.store = tmp_path / "store"
        self.store.mkdir()
        self.nodes: list[NodeProc] = []

    def node(self, node_id: int, *, schema: bool = True, **extra: Any) -> NodeProc:
        cfg = {**node_cfg(self.server, self.store), **extra}
        n = NodeProc(self.tmp / f"node{node_id}", node_id, cfg)
        if schema:
            n.execute(SCHEMA)
        self.nodes.append(n)
        return n

    def push_past(self, writer: NodeProc, pos: int, start: int) -> int:
        """Write rows on ``writer`` until the stream no longer holds ``pos`` + 1; returns the next
        free id."""
        i = start
        while stream_state(self.server)[0] <= pos + 1:
            write(writer, range(i, i + 10))
            i += 10
            assert i < start + 5000, "the stream never dropped its old messages"
        wait_until(lambda: position(writer) == stream_state(self.server)[1], 20,
                   "the writer to apply its own messages")
        return i

    def stop_all(self) -> None:
        for n in self.nodes:
            n.stop()


@pytest.fixture
def cluster(tmp_path: Path, nats_server: NatsServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, nats_server)
    try:
        yield c
    finally:
        c.stop_all()


def test_node_behind_the_stream_restores_and_resumes_after_the_snapshot(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 20, "b to replicate")
    b.stop()
    b_pos = position(b)
    next_id = cluster.push_past(a, b_pos, 21)
    snap = save_snapshot(a)
    seq = manifest(cluster.store, snap)["sequences"][STREAM]
    first, last, _ = stream_state(cluster.server)
    assert first <= seq + 1 <= last + 1
    write(a, range(next_id, next_id + 10))  # replayed over the snapshot
    mark = len(b.log_text())
    b.start()
    text = log_after(b, mark)
    assert "the streams no longer hold the messages after this node's position" in text
    # The rows pushed past b's position also pass the leader's message-count trigger, so a's own
    # snapshot may land beside or after the manual one, at the same position or a later one: b
    # restores one at the newest position, never an older one.
    restored = re.search(r"Snapshot restored (\S+)", text)
    assert restored is not None, text
    seq_restored = manifest(cluster.store, restored[1])["sequences"][STREAM]
    assert restored[1] == snap or seq_restored >= seq, (restored[1], snap, seq_restored, seq)
    assert f"consuming {STREAM} from sequence {seq_restored + 1}" in text
    assert "lost to this node" not in text
    wait_until(lambda: items(b) == items(a) and len(items(a)) == next_id + 9, 30,
               "b to converge")
    assert position(b) == stream_state(cluster.server)[1]


def test_forced_restore_by_the_seed_procedure_and_a_new_node(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 31))
    wait_until(lambda: len(items(b)) == 30, 20, "b to replicate")
    snap = save_snapshot(a)
    write(a, range(31, 41))
    # The seed: stop, rm data.db and seq-map.cbor, start.
    b.stop()
    b.db.unlink()
    for extra in ("-wal", "-shm"):
        Path(f"{b.db}{extra}").unlink(missing_ok=True)
    (b.dir / "seq-map.cbor").unlink()
    mark = len(b.log_text())
    b.start()
    assert f"Snapshot restored {snap}" in log_after(b, mark)
    # A new node with no database file at all.
    c = cluster.node(3, schema=False)
    assert not c.db.exists()
    c.start()
    assert f"Snapshot restored {snap}" in c.log_text()
    write(a, range(41, 51))
    for n in (b, c):
        _converge(a, n, 50)
    assert c.query("PRAGMA integrity_check") == [("ok",)]


def _converge(a: NodeProc, n: NodeProc, rows: int) -> None:
    wait_until(lambda: items(n) == items(a) and len(items(a)) == rows, 30,
               f"node {n.node_id} to converge")


def test_new_node_without_snapshot_starts_empty(cluster: Cluster) -> None:
    c = cluster.node(3, schema=False).start()
    assert "no snapshot in the store: starting with an empty database" in c.log_text()
    assert c.query("SELECT count(*) FROM sqlite_master WHERE name = 'items'") == [(0,)]


def _corrupt(store: Path, snapshot_id: str, how: str) -> str:
    data = next(p for p in (store / "snapshots").glob(f"{snapshot_id}.db*"))
    raw = bytearray(data.read_bytes())
    if how == "truncate":
        data.write_bytes(bytes(raw[: len(raw) // 2]))
        return "size"
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    return "sha256"


@pytest.mark.parametrize("how", ["truncate", "bitflip"])
def test_unsound_newest_snapshot_falls_back_to_the_previous(cluster: Cluster, how: str) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 20, "b to replicate")
    older = save_snapshot(a)
    b.stop()  # at the older snapshot's position: falling back to it loses nothing of b's
    write(a, range(21, 31))
    newest = save_snapshot(a)
    check = _corrupt(cluster.store, newest, how)
    (b.dir / "seq-map.cbor").unlink()
    mark = len(b.log_text())
    b.start()
    text = log_after(b, mark)
    assert f"snapshot {newest} is unsound: check {check} failed" in text
    assert f"Snapshot restored {older}" in text
    wait_until(lambda: items(b) == items(a), 30, "b to converge")


def test_no_sound_snapshot_exits_and_leaves_the_database(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 11))
    wait_until(lambda: len(items(b)) == 10, 20, "b to replicate")
    ids = [save_snapshot(a), save_snapshot(a)]
    for sid, how in zip(ids, ["truncate", "bitflip"], strict=True):
        _corrupt(cluster.store, sid, how)
    b.stop()
    (b.dir / "seq-map.cbor").unlink()
    before = db_digest(b.db)
    b.start_async()
    assert b.proc is not None
    code = b.proc.wait(60)
    b.proc = None
    assert code == 1
    text = b.log_text()
    assert "no sound snapshot to restore from" in text
    assert all(sid in text for sid in ids)
    assert db_digest(b.db) == before
    # The CLI says the same, with the same exit code.
    res = cli(b, "restore")
    assert res.returncode == 1 and "no sound snapshot" in res.stderr
    assert db_digest(b.db) == before


@pytest.mark.parametrize("phase", ["mid", "after"])
def test_sigkill_during_install_then_restart(cluster: Cluster, phase: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    a.execute("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 3000) "
              "INSERT INTO items SELECT i, hex(randomblob(400)) FROM s")
    wait_until(lambda: len(items(b)) == 3000, 30, "b to replicate")
    snap = save_snapshot(a)
    b.stop()
    b.execute("DELETE FROM items WHERE id > 2000")  # b's own state differs from the snapshot
    old = items(b)
    b.execute("UPDATE __harmonylite__state SET v = (SELECT max(id) FROM __harmonylite__log) "
              "WHERE k = 'published'")  # that local delete is not for publishing
    (b.dir / "seq-map.cbor").unlink()
    marker = b.dir / "paused"
    monkeypatch.setenv(PAUSE_ENV, f"{phase}:{marker}")
    b.start_async()
    monkeypatch.delenv(PAUSE_ENV)
    wait_until(marker.exists, 60, "the install to pause")
    b.kill()
    check = sqlite3.connect(b.db)
    try:
        assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        now = check.execute("SELECT id, v FROM items ORDER BY id").fetchall()
    finally:
        check.close()
    assert now == (old if phase == "mid" else items(a))
    assert not (b.dir / "seq-map.cbor").exists()
    mark = len(b.log_text())
    b.start()
    assert f"Snapshot restored {snap}" in log_after(b, mark)
    write(a, range(3001, 3011))
    wait_until(lambda: items(b) == items(a), 30, "b to converge")


def test_pending_local_writes_are_published_before_a_restore(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 11))
    wait_until(lambda: len(items(b)) == 10, 20, "b to replicate")
    save_snapshot(a)
    b.stop()
    write(b, range(100, 120))  # captured while the node is down: pending
    (b.dir / "seq-map.cbor").unlink()
    mark = len(b.log_text())
    b.start()
    text = log_after(b, mark)
    assert "published 20 pending local changes before the restore" in text
    assert "Snapshot restored" in text
    wait_until(lambda: len(items(a)) == 30 and items(b) == items(a), 30,
               "the local writes to reach both nodes")


def test_forced_restore_cli_refuses_while_running_and_when_nats_is_down(
    cluster: Cluster,
) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 11))
    wait_until(lambda: len(items(b)) == 10, 20, "b to replicate")
    snap = save_snapshot(a)
    res = cli(b, "restore")
    assert res.returncode == 1 and "open in another process" in res.stderr
    b.stop()
    a.stop()
    write(b, range(100, 107))
    cluster.server.stop()
    before = db_digest(b.db)
    res = cli(b, "restore", "latest")
    assert res.returncode == 1
    assert "refusing to restore: 7 local changes not yet published would be lost" in res.stderr
    assert db_digest(b.db) == before
    res = cli(b, "restore", "latest", "--force")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == snap
    assert [r[0] for r in items(b)] == list(range(1, 11))
    assert b.query("SELECT seq FROM __harmonylite__seq") == [
        (manifest(cluster.store, snap)["sequences"][STREAM],)]
