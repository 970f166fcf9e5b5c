"""A transaction committed on one node becomes visible on another in one piece (within a shard).

Real node processes and a real nats-server: a writer on node 1 commits 2,000-row transactions
that move amounts between rows of the same shard, so every shard's sum never changes; a reader
on node 2 sums each shard in read transactions while they arrive and must never see another sum.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harmonylite.replication.event import shard_of
from nodes import NodeProc, wait_until
from servers import NatsServer

ROWS = 3000
PER_TXN = 2000
START = 1000  # every row's balance at the start


@pytest.fixture(params=[1, 4], ids=["1-shard", "4-shards"])
def pair(request: pytest.FixtureRequest, tmp_path: Path,
         nats_server: NatsServer) -> Iterator[tuple[NodeProc, NodeProc, int]]:
    shards = int(request.param)
    nodes = []
    for i in (1, 2):
        cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]},
                               "replication_log": {"shards": shards}}
        node = NodeProc(tmp_path / f"node{i}", i, cfg)
        node.execute("CREATE TABLE accounts(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
        nodes.append(node.start())
    yield nodes[0], nodes[1], shards
    for node in nodes:
        node.stop()


def transfers(rng: random.Random, shard: dict[int, int],
              bal: dict[int, int]) -> list[tuple[int, int]]:
    """(new balance, id) for PER_TXN rows: pairs of rows of one shard, one gives what the other
    gets. Balances are written as values, not read back: the test watches what node 2 shows."""
    by_shard: dict[int, list[int]] = {}
    for i in rng.sample(range(1, ROWS + 1), PER_TXN):
        by_shard.setdefault(shard[i], []).append(i)
    for ids in by_shard.values():
        for a, b in zip(ids[0::2], ids[1::2], strict=False):
            x = rng.randint(1, 50)
            bal[a] -= x
            bal[b] += x
        # An odd one out is written unchanged: the transaction stays PER_TXN rows.
    return [(bal[i], i) for ids in by_shard.values() for i in ids]


def test_a_reader_never_sees_part_of_a_transaction(
        pair: tuple[NodeProc, NodeProc, int]) -> None:
    a, b, shards = pair
    shard = {i: shard_of("accounts", [i], shards) for i in range(1, ROWS + 1)}
    expected = {s: 0 for s in set(shard.values())}
    for i in range(1, ROWS + 1):
        expected[shard[i]] += START
    conn = a.connect()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO accounts VALUES (?, ?)",
                     [(i, START) for i in range(1, ROWS + 1)])
    conn.execute("COMMIT")
    wait_until(lambda: b.query("SELECT count(*) FROM accounts")[0][0] == ROWS, 60,
               "the initial rows on node 2")

    stop = threading.Event()
    broken: list[dict[int, int]] = []
    states: set[tuple[tuple[int, int], ...]] = set()
    reads = 0

    def read() -> None:
        nonlocal reads
        r = sqlite3.connect(b.db, isolation_level=None, timeout=30)
        try:
            while not stop.is_set():
                r.execute("BEGIN")
                rows = r.execute("SELECT id, bal FROM accounts").fetchall()
                r.execute("COMMIT")
                sums = {s: 0 for s in expected}
                for i, bal in rows:
                    sums[shard[i]] += bal
                reads += 1
                states.add(tuple(sorted(rows[:50])))
                if sums != expected:
                    broken.append(sums)
        finally:
            r.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    rng = random.Random(11)
    bal = dict.fromkeys(range(1, ROWS + 1), START)
    txns = 20
    try:
        for _ in range(txns):
            conn.execute("BEGIN")
            conn.executemany("UPDATE accounts SET bal = ? WHERE id = ?",
                             transfers(rng, shard, bal))
            conn.execute("COMMIT")
            time.sleep(0.05)  # give the publisher time to start on it mid-way through the next
        final = sorted(bal.items())
        wait_until(lambda: b.query("SELECT id, bal FROM accounts ORDER BY id") == final, 120,
                   "node 2 to converge")
    finally:
        stop.set()
        reader.join(30)
        conn.close()
    assert reads > 50, f"the reader read only {reads} times"
    assert len(states) > 3, "the reader never saw the rows change: the test proves nothing"
    assert not broken, (f"{len(broken)} of {reads} reads on node 2 saw a transaction in part "
                        f"(sums per shard {broken[0]}, expected {expected})")


def test_a_200000_row_bulk_load_arrives_in_one_piece(tmp_path: Path,
                                                      nats_server: NatsServer) -> None:
    nodes = []
    for i in (1, 2):
        node = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [nats_server.url]},
                                                   "replication_log": {"shards": 2}})
        node.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER)")
        nodes.append(node.start())
    a, b = nodes
    total = 200_000
    stop = threading.Event()
    seen: set[int] = set()

    def read() -> None:
        r = sqlite3.connect(b.db, isolation_level=None, timeout=30)
        try:
            while not stop.is_set():
                seen.add(r.execute("SELECT count(*) FROM items").fetchone()[0])
        finally:
            r.close()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        conn = a.connect()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?)",
                         ((i, f"item {i:08d}", i % 97) for i in range(total)))
        conn.execute("COMMIT")
        conn.close()
        wait_until(lambda: total in seen, 300, "the bulk load on node 2")
    finally:
        stop.set()
        reader.join(30)
        for node in nodes:
            node.stop()
    # Two shards: each applies its own part whole, so a reader sees 0, one shard's part, or all.
    per_shard = {s: 0 for s in (1, 2)}
    for i in range(total):
        per_shard[shard_of("items", [i], 2)] += 1
    assert seen <= {0, per_shard[1], per_shard[2], total}, sorted(seen)[:20]
