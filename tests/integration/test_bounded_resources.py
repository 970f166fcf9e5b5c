"""Resources stay bounded on real node processes: the WAL after a long reader, and the memory a
large value costs."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

MB = 1024 * 1024


@pytest.fixture
def pair(tmp_path: Path, nats_server: NatsServer) -> Iterator[tuple[NodeProc, NodeProc]]:
    nodes = []
    for i in (1, 2):
        cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]}}
        node = NodeProc(tmp_path / f"node{i}", i, cfg)
        node.execute("CREATE TABLE files(id INTEGER PRIMARY KEY, body BLOB)")
        nodes.append(node.start())
    yield nodes[0], nodes[1]
    for node in nodes:
        node.stop()


def wal_size(node: NodeProc) -> int:
    try:
        return os.path.getsize(f"{node.db}-wal")
    except FileNotFoundError:
        return 0


def test_the_wal_shrinks_back_after_a_long_reader(pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    reader = sqlite3.connect(b.db, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM files").fetchone()  # holds its view from here on
    conn = a.connect()
    written = 0
    for t in range(300):  # 30 MB in 100-row transactions, arriving while the reader reads
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO files VALUES (?, ?)",
                         [(t * 100 + i, os.urandom(1000)) for i in range(100)])
        conn.execute("COMMIT")
        written += 100
    conn.close()
    wait_until(lambda: b.query("SELECT count(*) FROM files")[0][0] == written, 120,
               "the rows on node 2")
    grown = wal_size(b)
    assert grown > 25 * MB, f"the reader did not hold the WAL back ({grown} bytes)"
    reader.execute("COMMIT")
    reader.close()
    # Nothing is written any more: the node itself must give the space back.
    wait_until(lambda: wal_size(b) <= 4 * MB, 30,
               f"node 2's WAL to shrink after the reader (it is {wal_size(b)} bytes)")
