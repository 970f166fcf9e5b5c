"""Bulk load and catch-up, node 1 -> node 2 (real node processes, loopback nats-server, 1 shard).

- **bulk**: one transaction of ``--rows`` rows (200,000) on node 1, from its commit until node 2
  holds them all.
- **catch-up**: node 2 stopped while node 1 writes ``--rows`` rows in 100-row transactions and
  publishes them; then node 2 starts, timed from its start until it holds them all (its start-up
  included).

The floor measured in the same run: raw ``publish_async`` of the same number of single-row
messages (see ``replication_throughput``). Targets: bulk >= 50,000 rows/s, catch-up >= 50,000
rows/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from nodes import NodeProc, wait_until  # noqa: E402
from replication_throughput import floor_rate  # noqa: E402
from servers import NatsServer  # noqa: E402

TABLE = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL)"


def _count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM items").fetchone()[0])


def _nodes(base: Path, server: NatsServer, tag: str) -> list[NodeProc]:
    nodes = []
    for i in (1, 2):
        node = NodeProc(base / f"{tag}n{i}", i, {"nats": {"urls": [server.url],
                                                          "stream_prefix": f"bc{tag}",
                                                          "subject_prefix": f"bc{tag}"}})
        node.execute(TABLE)
        nodes.append(node)
    return nodes


def bulk(base: Path, server: NatsServer, rows: int) -> float:
    a, b = _nodes(base, server, "bulk")
    a.start()
    b.start()
    try:
        conn = a.connect()
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                         ((i, f"item {i:08d}", i % 97, i * 0.25) for i in range(rows)))
        conn.execute("COMMIT")
        start = time.perf_counter()
        conn.close()
        probe = b.connect()
        wait_until(lambda: _count(probe) == rows, 600, "the bulk load on node 2")
        elapsed = time.perf_counter() - start
        probe.close()
    finally:
        a.stop()
        b.stop()
    return rows / elapsed


def catch_up(base: Path, server: NatsServer, rows: int) -> float:
    a, b = _nodes(base, server, "cu")
    a.start()
    b.start()
    b.stop()
    try:
        conn = a.connect()
        for t in range(0, rows, 100):
            conn.execute("BEGIN")
            conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                             [(i, f"item {i:08d}", i % 97, i * 0.25)
                              for i in range(t, min(rows, t + 100))])
            conn.execute("COMMIT")
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM __harmonylite__log WHERE id > (SELECT v FROM "
            "__harmonylite__state WHERE k = 'published')").fetchone()[0] == 0, 600,
            "node 1 to publish everything")
        conn.close()
        start = time.perf_counter()
        b.start_async()
        wait_until(lambda: b.db.exists() and _count(probe_of(b)) == rows, 600,
                   "node 2 to catch up")
        elapsed = time.perf_counter() - start
    finally:
        a.stop()
        b.stop()
    return rows / elapsed


def probe_of(node: NodeProc) -> sqlite3.Connection:
    conn = getattr(node, "_bench_probe", None)
    if conn is None:
        conn = node.connect()
        node._bench_probe = conn  # type: ignore[attr-defined]
    return conn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = NatsServer(base / "nats").start()
        try:
            floor = asyncio.run(floor_rate(server.url))
            b = bulk(base, server, args.rows)
            print(f"  bulk: {args.rows:,} rows in one transaction: {b:,.0f} rows/s", flush=True)
            c = catch_up(base, server, args.rows)
            print(f"  catch-up of {args.rows:,} rows: {c:,.0f} rows/s", flush=True)
        finally:
            server.stop()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"floor: raw JetStream publish_async of single-row messages: {floor:,.0f} msg/s")
    print(f"RESULT bulk rows_per_s={b:.0f} floor={floor:.0f} target>=50000 "
          f"{'PASS' if b >= 50_000 else 'FAIL'} (load {load})")
    print(f"RESULT catch_up rows_per_s={c:.0f} floor={floor:.0f} target>=50000 "
          f"{'PASS' if c >= 50_000 else 'FAIL'} (load {load})")


if __name__ == "__main__":
    main()
