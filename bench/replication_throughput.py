"""Replication throughput: 20,000 rows written on node 1 in 100-row transactions, until all are
applied on node 2 (one shard, loopback nats-server, both nodes real processes).

The floor measured in the same run is the raw JetStream rate of this machine: the same number of
rows published as one 300-byte message each with publish_async and acknowledged (nats-py-facts.md:
50-60k msg/s). Target: >= 40,000 rows/s end to end (goal 60,000).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402

from nodes import NodeProc, wait_until  # noqa: E402
from servers import NatsServer  # noqa: E402

ROWS = 20_000
TX = 100
ROUNDS = 3


async def floor_rate(url: str) -> float:
    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=256)
    await js.add_stream(name="floor", subjects=["floor"])
    payload = b"x" * 300
    start = time.perf_counter()
    for _ in range(ROWS):
        await js.publish_async("floor", payload)
    await js.publish_async_completed()
    elapsed = time.perf_counter() - start
    await js.delete_stream("floor")
    await nc.close()
    return ROWS / elapsed


def one_round(base: Path, server: NatsServer, r: int) -> float:
    nodes = []
    for i in (1, 2):
        node = NodeProc(base / f"r{r}n{i}", i, {"nats": {"urls": [server.url],
                                                         "stream_prefix": f"bench{r}",
                                                         "subject_prefix": f"bench{r}"}})
        node.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, "
                     "price REAL)")
        nodes.append(node.start())
    a, b = nodes
    conn = a.connect()
    start = time.perf_counter()
    for t in range(ROWS // TX):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                         [(t * TX + k, f"item {t * TX + k}", k, k * 0.25) for k in range(TX)])
        conn.execute("COMMIT")
    conn.close()
    written = time.perf_counter() - start
    probe = b.connect()
    wait_until(lambda: probe.execute("SELECT count(*) FROM items").fetchone()[0] == ROWS, 120,
               "all rows on node 2")
    elapsed = time.perf_counter() - start
    probe.close()
    for n in nodes:
        n.stop()
    print(f"  round {r}: wrote in {written:.2f}s, all applied on node 2 after {elapsed:.2f}s "
          f"= {ROWS / elapsed:,.0f} rows/s")
    return ROWS / elapsed


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            rates, floors = [], []
            for r in range(ROUNDS):
                floors.append(asyncio.run(floor_rate(server.url)))
                rates.append(one_round(Path(tmp), server, r))
        finally:
            server.stop()
    rate, floor = statistics.median(rates), statistics.median(floors)
    print(f"floor: raw JetStream publish_async of {ROWS} single-row messages: {floor:,.0f} msg/s")
    print(f"RESULT replication_throughput rows_per_s={rate:.0f} floor={floor:.0f} "
          f"ratio={rate / floor:.2f} target>=40000 {'PASS' if rate >= 40_000 else 'FAIL'}")


if __name__ == "__main__":
    main()
