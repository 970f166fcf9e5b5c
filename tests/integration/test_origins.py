"""An origin is unique: a database copied to a second node, and a node_id two live nodes share,
never make one node's changes pass for another's (real nodes, real nats-server)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import nats
import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, note TEXT)"


def ids(n: NodeProc) -> set[int]:
    return {r[0] for r in n.query("SELECT id FROM items")}


def write(n: NodeProc, rows: range) -> None:
    conn = n.connect()
    try:
        for i in rows:  # one transaction each: change ids as an application makes them
            conn.execute("INSERT INTO items VALUES (?, ?)", (i, f"written on {n.dir.name}"))
    finally:
        conn.close()


def copy_node(src: NodeProc, dst_dir: Path) -> None:
    """What an operator does with `cp` (or a disk image): the database and its sequence map."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in ("data.db", "data.db-wal", "seq-map.cbor"):
        if (src.dir / name).exists():
            shutil.copy2(src.dir / name, dst_dir / name)


def test_copied_database_keeps_every_row(tmp_path: Path, nats_server: NatsServer) -> None:
    """Node A's disk copied to make node B, neither with a node_id (both derive the same one from
    the machine id), run one after the other: every row either writes reaches every node."""
    cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]}}
    a = NodeProc(tmp_path / "a", 0, cfg)  # node_id 0: the machine-id default
    c = NodeProc(tmp_path / "c", 3, cfg)
    for n in (a, c):
        n.connect().executescript(SCHEMA)
    a.start()
    c.start()
    write(a, range(1, 21))
    wait_until(lambda: ids(c) >= set(range(1, 21)), 60, "node C to have A's first rows")
    a.stop()

    b = NodeProc(tmp_path / "b", 0, cfg)
    copy_node(a, b.dir)
    b.start()
    write(b, range(101, 121))
    wait_until(lambda: ids(c) >= set(range(101, 121)), 60, "node C to have B's rows")
    b.stop()

    a.start()
    write(a, range(201, 221))
    want = set(range(1, 21)) | set(range(101, 121)) | set(range(201, 221))
    wait_until(lambda: ids(a) == want, 60, "node A to have every row")
    wait_until(lambda: ids(c) == want, 60,
               f"node C to have every row (missing {sorted(want - ids(c))})")
    a.stop()
    b.start()
    wait_until(lambda: ids(b) == want, 60,
               f"node B to have every row (missing {sorted(want - ids(b))})")
    assert "copied or moved" in b.log_text()  # the copy was recognised and said so
    b.stop()
    c.stop()


@pytest.mark.parametrize("node_id", [0, 7], ids=["machine-id-default", "explicit"])
def test_node_id_of_a_live_node_is_refused(tmp_path: Path, nats_server: NatsServer,
                                           node_id: int) -> None:
    """A second live node with the same node_id (explicit, or the machine-id default on a cloned
    machine) refuses to start, naming both nodes; with a distinct node_id it runs, and every row
    reaches both."""
    cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]},
                           "snapshot": {"enabled": False, "leader_ttl": 3000}}
    a = NodeProc(tmp_path / "a", node_id, cfg)
    a.connect().executescript(SCHEMA)
    a.start()
    write(a, range(1, 11))
    b_dir = tmp_path / "b"
    copy_node(a, b_dir)
    b = NodeProc(b_dir, node_id, cfg)
    b.start_async()
    assert b.proc is not None
    wait_until(lambda: b.proc is not None and b.proc.poll() is not None, 60,
               "the second node with the same node_id to refuse to start")
    assert b.proc.returncode == 2
    said = b.log_text()
    assert a.proc is not None
    for part in (str(a.db), str(b.db), f"pid {a.proc.pid}", "set a distinct node_id"):
        assert part in said, f"{part!r} not in:\n{said[-2000:]}"
    assert a.proc.poll() is None  # the node already running is left alone

    b = NodeProc(b_dir, 9 if node_id == 7 else 8, cfg)  # the operator's fix
    b.start()
    write(a, range(11, 31))
    write(b, range(101, 121))
    want = set(range(1, 31)) | set(range(101, 121))
    for n in (a, b):
        wait_until(lambda n=n: ids(n) == want, 60,  # type: ignore[misc]
                   f"{n.dir.name} to have every row (missing {sorted(want - ids(n))})")
    b.stop()
    a.stop()


def test_running_node_whose_node_id_is_taken_stops(tmp_path: Path,
                                                   nats_server: NatsServer) -> None:
    """A running node that finds its node_id claimed by another process (a clone that took a
    claim it believed stale) stops with exit 2, naming the other process."""
    cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]},
                           "snapshot": {"enabled": False, "leader_ttl": 3000}}
    a = NodeProc(tmp_path / "a", 7, cfg)
    a.connect().executescript(SCHEMA)
    a.start()

    async def take() -> None:
        nc = await nats.connect(nats_server.url)
        kv = await nc.jetstream().key_value("e-harmonylite")
        await kv.put("node-7", json.dumps({"node_id": 7, "instance": "0badc0de", "host": "clone",
                                           "pid": 4242, "db_path": "/elsewhere/data.db"}).encode())
        await nc.close()

    asyncio.run(take())
    assert a.proc is not None
    wait_until(lambda: a.proc is not None and a.proc.poll() is not None, 30,
               "the node to stop once its node_id is taken")
    assert a.proc.returncode == 2
    said = a.log_text()
    assert "host clone, pid 4242" in said and "/elsewhere/data.db" in said, said[-2000:]
