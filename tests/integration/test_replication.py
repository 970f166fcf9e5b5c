"""Nodes as real processes replicating through a real nats-server on loopback."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import nats
import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, owner INTEGER, name TEXT, qty REAL)"


def make_nodes(tmp_path: Path, server: NatsServer, count: int, schema: str = SCHEMA,
               **extra: Any) -> list[NodeProc]:
    nodes = []
    for i in range(1, count + 1):
        cfg: dict[str, Any] = {"nats": {"urls": [server.url]}, **extra}
        node = NodeProc(tmp_path / f"node{i}", i, cfg)
        for stmt in schema.split(";"):
            if stmt.strip():
                node.execute(stmt)
        nodes.append(node)
    return nodes


@pytest.fixture
def cluster3(tmp_path: Path, nats_server: NatsServer) -> Iterator[list[NodeProc]]:
    nodes = make_nodes(tmp_path, nats_server, 3, replication_log={"shards": 4})
    for n in nodes:
        n.start()
    yield nodes
    for n in nodes:
        n.stop()


def snapshot_of(node: NodeProc, table: str = "items") -> list[tuple[Any, ...]]:
    return node.query(f'SELECT * FROM "{table}" ORDER BY 1')


def converged(nodes: list[NodeProc], table: str = "items") -> bool:
    first = snapshot_of(nodes[0], table)
    return all(snapshot_of(n, table) == first for n in nodes[1:])


def test_three_nodes_converge_on_inserts_updates_deletes(cluster3: list[NodeProc]) -> None:
    rng = random.Random(7)
    for round_ in range(3):
        for idx, node in enumerate(cluster3):
            conn = node.connect()
            for k in range(40):
                rid = idx * 1000 + round_ * 100 + k
                conn.execute("INSERT INTO items VALUES (?, ?, ?, ?)",
                             (rid, idx, f"n{idx}-{k}", rng.random()))
            conn.execute("UPDATE items SET qty = qty + 1 WHERE owner = ? AND id % 3 = 0", (idx,))
            conn.execute("DELETE FROM items WHERE owner = ? AND id % 5 = 0", (idx,))
            conn.close()
    expected_rows = sum(1 for idx in range(3) for r in range(3) for k in range(40)
                        if (idx * 1000 + r * 100 + k) % 5 != 0)
    wait_until(lambda: converged(cluster3) and len(snapshot_of(cluster3[0])) == expected_rows,
               30, "three nodes to converge")
    # Several shards were really used.
    names = {n for node in cluster3 for n in
             node.query("SELECT stream FROM __harmonylite__seq")}
    assert len(names) == 4


def test_same_row_written_on_two_nodes_ends_identical(cluster3: list[NodeProc]) -> None:
    a, b, _ = cluster3
    a.execute("INSERT INTO items VALUES (1, 0, 'start', 0)")
    wait_until(lambda: all(snapshot_of(n) for n in cluster3), 15, "the row everywhere")
    barrier = threading.Barrier(2)

    def writer(node: NodeProc, label: str) -> None:
        conn = node.connect()
        barrier.wait()
        for i in range(50):
            conn.execute("UPDATE items SET name = ?, qty = ? WHERE id = 1", (f"{label}{i}", i))
        conn.close()

    threads = [threading.Thread(target=writer, args=(a, "a")),
               threading.Thread(target=writer, args=(b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: converged(cluster3) and snapshot_of(a)[0][3] == 49, 20,
               "the contended row to converge")
    assert snapshot_of(a)[0][2] in ("a49", "b49")


def test_killed_node_restarts_and_catches_up_without_loss_or_duplicates(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    schema = SCHEMA + "; CREATE TABLE hits(id INTEGER PRIMARY KEY, origin INTEGER, n INTEGER)"
    nodes = make_nodes(tmp_path, nats_server, 2, schema)
    writer_node, victim = (n.start() for n in nodes)
    stop = threading.Event()
    written: list[int] = []

    def write() -> None:
        conn = writer_node.connect()
        i = 0
        while not stop.is_set() and i < 3000:
            i += 1
            conn.execute("INSERT INTO hits VALUES (?, 1, ?)", (i, i))
            written.append(i)
        conn.close()

    t = threading.Thread(target=write)
    t.start()
    wait_until(lambda: len(victim.query("SELECT id FROM hits")) > 200, 20, "replication to start")
    victim.kill()
    # The victim wrote too, while it was running and while it is down (its app keeps writing).
    victim.execute("INSERT INTO hits VALUES (100000, 2, 1)")
    wait_until(lambda: len(written) > 1500, 30, "more writes while the victim is down")
    victim.start()
    stop.set()
    t.join()
    total = len(written) + 1
    wait_until(lambda: victim.query("SELECT count(*) FROM hits")[0][0] == total
               and writer_node.query("SELECT count(*) FROM hits")[0][0] == total,
               40, "both nodes to hold every row")
    assert converged(nodes, "hits")
    # Inserts carry n = id: a duplicate or a stale re-apply would show as a mismatch.
    assert victim.query("SELECT count(*) FROM hits WHERE n != id AND origin = 1") == [(0,)]
    for n in nodes:
        n.stop()


def test_nats_restart_while_writes_go_on(tmp_path: Path, nats_server: NatsServer) -> None:
    nodes = make_nodes(tmp_path, nats_server, 2)
    a, b = (n.start() for n in nodes)
    conn = a.connect()
    for i in range(100):
        conn.execute("INSERT INTO items VALUES (?, 1, 'before', 0)", (i,))
    wait_until(lambda: len(snapshot_of(b)) == 100, 15, "first rows")
    nats_server.stop()
    for i in range(100, 300):  # the application keeps writing while NATS is down
        conn.execute("INSERT INTO items VALUES (?, 1, 'during', 0)", (i,))
    pending = a.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                      "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0]
    assert pending > 0
    nats_server.start()
    for i in range(300, 350):
        conn.execute("INSERT INTO items VALUES (?, 1, 'after', 0)", (i,))
    conn.close()
    wait_until(lambda: len(snapshot_of(b)) == 350 and converged(nodes), 60,
               "pending changes to flush after NATS returns")
    for n in nodes:
        assert n.stop() == 0


def test_weird_identifiers_and_table_without_primary_key(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    schema = ('CREATE TABLE "order items"("order id" INTEGER PRIMARY KEY, "a""b" TEXT, '
              '"select" BLOB); CREATE TABLE nokey(a TEXT, b INTEGER)')
    nodes = make_nodes(tmp_path, nats_server, 2, schema)
    a, b = (n.start() for n in nodes)
    assert "no primary key" in a.log_text()
    a.execute('INSERT INTO "order items" VALUES (1, \'x"y\', X\'00ff\')')
    a.execute('UPDATE "order items" SET "a""b" = \'z\' WHERE "order id" = 1')
    a.execute('INSERT INTO "order items" VALUES (2, \'gone\', NULL)')
    a.execute('DELETE FROM "order items" WHERE "order id" = 2')
    a.execute("INSERT INTO nokey VALUES ('one', 1), ('two', 2)")
    a.execute("UPDATE nokey SET b = 20 WHERE a = 'two'")
    a.execute("DELETE FROM nokey WHERE a = 'one'")
    wait_until(lambda: b.query('SELECT * FROM "order items"') == [(1, "z", b"\x00\xff")]
               and b.query("SELECT rowid, a, b FROM nokey") == [(2, "two", 20)],
               15, "weird tables to replicate")
    for n in nodes:
        n.stop()


def test_garbage_message_is_dead_lettered_and_the_rest_applies(
        tmp_path: Path, nats_server: NatsServer) -> None:
    nodes = make_nodes(tmp_path, nats_server, 2)
    a, b = (n.start() for n in nodes)
    a.execute("INSERT INTO items VALUES (1, 1, 'one', 1)")
    wait_until(lambda: len(snapshot_of(b)) == 1, 15, "first row")

    async def send_garbage() -> int:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        ack = await js.publish("harmonylite-change-log-1", b"\xff\x00 definitely not cbor")
        await js.publish("harmonylite-change-log-1", b"\xa1\x61v\x01")  # CBOR, wrong shape
        await nc.close()
        return int(ack.seq)

    garbage_seq = asyncio.run(send_garbage())
    a.execute("INSERT INTO items VALUES (2, 1, 'two', 2)")
    wait_until(lambda: len(snapshot_of(b)) == 2, 15, "the row after the garbage")
    for n in nodes:
        text = n.log_text()
        assert f"harmonylite-changes-c-1 sequence {garbage_seq}" in text
        assert "dead-letters" in text
        dead = n.query("SELECT stream, seq, tbl, error FROM __harmonylite__dead_letter "
                       "ORDER BY seq")
        assert [(s, q) for s, q, _, _ in dead] == [("harmonylite-changes-c-1", garbage_seq),
                                                   ("harmonylite-changes-c-1", garbage_seq + 1)]
        assert all(t is None and "change batch" in e for _, _, t, e in dead)
    listing = subprocess.run(
        [sys.executable, "-m", "harmonylite", "-config", str(b.config_path), "dead-letters",
         "list", "--json"], capture_output=True, text=True, timeout=60, check=True)
    assert [d["sequence"] for d in json.loads(listing.stdout)] == [garbage_seq, garbage_seq + 1]
    assert converged(nodes)
    for n in nodes:
        assert n.stop(signal.SIGINT) == 0


def test_dead_letter_of_a_malformed_batch_names_its_origin_table_and_key(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """A batch from node 9 that names no key columns is refused whole; its dead letter still
    names node 9, the table and (by the local primary key) the key."""
    (a,) = make_nodes(tmp_path, nats_server, 1)
    a.start()

    async def send() -> None:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        for table in ("items", "t"):
            doc = {"v": 1, "n": 9, "t": {table: ["id", "owner", "name", "qty"]}, "k": {},
                   "c": [[table, 1, [7, 9, "seven", 1.5]]]}
            await js.publish("harmonylite-change-log-1", cbor2.dumps(doc))
        await nc.close()

    asyncio.run(send())
    wait_until(lambda: a.query("SELECT count(*) FROM __harmonylite__dead_letter")[0][0] == 2,
               30, "both messages to be dead-lettered")
    out = a.cli("dead-letters", "list", "--json")
    assert out.returncode == 0, out.stderr
    listed = [(d["origin"], d["table"], d["key"]) for d in json.loads(out.stdout)]
    # The key of a table this node lacks is not carried by a message naming no key columns.
    assert listed == [(9, "items", "[7]"), (9, "t", None)]
    text = a.cli("dead-letters", "list")
    assert "node 9\titems\t[7]" in text.stdout, text.stdout
    assert "None" not in text.stdout, text.stdout
    a.stop()


def test_changes_to_a_table_a_node_lacks_wait_until_it_exists(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    nodes = make_nodes(tmp_path, nats_server, 2, cleanup_interval=300)
    a, b = nodes
    a.execute("CREATE TABLE late(id INTEGER PRIMARY KEY, v TEXT)")  # only node a has it
    a.start()
    b.start()
    a.execute("INSERT INTO late VALUES (1, 'one'), (2, 'two')")
    a.execute("UPDATE late SET v = 'TWO' WHERE id = 2")
    a.execute("INSERT INTO items VALUES (1, 1, 'after', 0)")
    wait_until(lambda: snapshot_of(b) == [(1, 1, "after", 0.0)], 15, "later messages to apply")
    assert "parked" in b.log_text()
    b.execute("CREATE TABLE late(id INTEGER PRIMARY KEY, v TEXT)")
    wait_until(lambda: b.query("SELECT * FROM late ORDER BY id") == [(1, "one"), (2, "TWO")],
               15, "the parked changes once the table exists")
    for n in nodes:
        n.stop()


def test_contended_rows_converge_under_concurrent_writers(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Three nodes hammer the same ten rows at once (updates, deletes, re-inserts): whatever the
    interleaving of publishes, acknowledgements and deliveries, every node ends identical."""
    nodes = make_nodes(tmp_path, nats_server, 3, replication_log={"shards": 2})
    for n in nodes:
        n.start()
    stop = threading.Event()

    def hammer(node: NodeProc, seed: int) -> None:
        rng = random.Random(seed)
        conn = node.connect()
        while not stop.is_set():
            rid = rng.randrange(10)
            op = rng.random()
            if op < 0.7:
                conn.execute("INSERT INTO items VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET "
                             "owner = excluded.owner, name = excluded.name, qty = excluded.qty",
                             (rid, node.node_id, f"n{node.node_id}", rng.random()))
            elif op < 0.85:
                conn.execute("DELETE FROM items WHERE id = ?", (rid,))
            else:
                conn.execute("BEGIN")
                for k in range(10):
                    conn.execute("UPDATE items SET qty = qty + 1 WHERE id = ?", (k,))
                conn.execute("COMMIT")
        conn.close()

    threads = [threading.Thread(target=hammer, args=(n, i)) for i, n in enumerate(nodes)]
    for t in threads:
        t.start()
    wait_until(lambda: sum(n.query("SELECT count(*) FROM __harmonylite__seq")[0][0]
                           for n in nodes) > 0, 20, "replication to run")
    stop.wait(4)  # the writers run for a fixed stretch of time
    stop.set()
    for t in threads:
        t.join()
    wait_until(lambda: converged(nodes), 40, "every node to hold the same rows")
    for n in nodes:
        n.stop()
