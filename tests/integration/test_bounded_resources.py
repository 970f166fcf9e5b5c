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


def memory(node: NodeProc, field: str) -> int:
    """A line of the node process's /proc status (VmRSS: now, VmHWM: its peak), in bytes."""
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{node.proc.pid}/status")


def positions(node: NodeProc) -> list[tuple[Any, ...]]:
    return node.query("SELECT stream, seq FROM __harmonylite__seq ORDER BY stream")


def test_a_large_value_costs_at_most_about_twice_its_size(
        pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO files VALUES (0, x'00')")  # everything warmed up: imports, buckets
    wait_until(lambda: b.query("SELECT count(*) FROM files")[0][0] == 1, 60, "the first row")
    wait_until(lambda: positions(a) == positions(b), 30, "node 1 to apply its own change")
    before = {n.node_id: memory(n, "VmRSS") for n in (a, b)}
    size = 30 * MB
    blob = os.urandom(size)  # random: compression does not shrink it
    a.execute("INSERT INTO files VALUES (1, ?)", (blob,))
    wait_until(lambda: b.query("SELECT length(body) FROM files WHERE id = 1") == [(size,)], 120,
               f"the blob on node 2; node 1's log:\n{a.log_text()[-2000:]}")
    assert b.query("SELECT body FROM files WHERE id = 1") == [(blob,)]
    wait_until(lambda: positions(a) == positions(b), 60, "node 1 to apply its own change")
    growth = {n.node_id: memory(n, "VmHWM") - before[n.node_id] for n in (a, b)}
    report = ", ".join(f"node {i}: +{g / MB:.0f} MB" for i, g in growth.items())
    assert all(g <= 2.5 * size for g in growth.values()), \
        f"peak memory grew by more than 2.5 x the {size // MB} MB value ({report})"
