"""Replication lag at a steady rate of single-row transactions (``--rate``, 1,000/s by
default), node 1 -> node 2.

Arrivals are taken by a probe on node 2 that watches ``PRAGMA data_version`` every 0.5 ms (a
read of shared memory) and queries the table only when it moved, so the probe does not compete
with the nodes for the two cores. Lag = arrival - commit on node 1, same clock. Before the
measured rows, 2,000 rows at about the same rate warm the nodes up (not measured). The floor
measured in the same run: nats-py publish -> receive latency at the same rate. Target: p99 <= 25
ms at 1,000/s (goal 10 ms).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import nats  # noqa: E402

from nodes import NodeProc, wait_until  # noqa: E402
from servers import NatsServer  # noqa: E402

RATE = 1000
SECONDS = 10
WARM_UP = 2_000  # rows written (about 1 per 1/RATE s) and replicated before the measured ones
N = RATE * SECONDS


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def floor_latency(url: str) -> list[float]:
    nc = await nats.connect(url)
    got: list[float] = []
    done = asyncio.Event()

    async def cb(msg: object) -> None:
        got.append(time.time() - float(msg.data))  # type: ignore[attr-defined]
        if len(got) == 1000:
            done.set()

    await nc.subscribe("lagfloor", cb=cb)
    for _ in range(1000):
        await nc.publish("lagfloor", str(time.time()).encode())
        await nc.flush()
        await asyncio.sleep(1 / RATE)
    await asyncio.wait_for(done.wait(), 10)
    await nc.close()
    return got


def main() -> None:
    global RATE, N
    if "--rate" in sys.argv:
        RATE = int(sys.argv[sys.argv.index("--rate") + 1])
        N = RATE * SECONDS
    with tempfile.TemporaryDirectory() as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        nodes = []
        try:
            for i in (1, 2):
                node = NodeProc(Path(tmp) / f"n{i}", i, {"nats": {"urls": [server.url]}})
                node.execute("CREATE TABLE ev(id INTEGER PRIMARY KEY, written REAL)")
                nodes.append(node.start())
            a, b = nodes
            # Arrival times are taken by polling node 2 (an application trigger would not do:
            # application triggers do not fire for replicated writes).
            arrivals: dict[int, float] = {}
            done = threading.Event()

            def poll() -> None:
                conn_b = b.connect()
                seen, version = -1, None  # (the warm-up rows have negative ids)
                while not done.is_set() and len(arrivals) < N:
                    now = conn_b.execute("PRAGMA data_version").fetchone()[0]
                    if now != version:
                        version = now
                        for (rid,) in conn_b.execute(
                                "SELECT id FROM ev WHERE id > ? ORDER BY id", (seen,)):
                            arrivals[rid] = time.time()
                            seen = rid
                    time.sleep(0.0005)  # the polling period (0.5 ms resolution)
                conn_b.close()

            conn = a.connect()
            # The nodes past their start-up (first schema look, the applier settling): the rows
            # of the first seconds after a start are not what the steady rate costs.
            warm = a.connect()
            for i in range(WARM_UP):
                warm.execute("INSERT INTO ev VALUES (?, ?)", (-1 - i, time.time()))
                time.sleep(1 / RATE)
            warm.close()
            wait_until(lambda: b.query("SELECT count(*) FROM ev")[0][0] == WARM_UP, 60,
                       "the warm-up rows on node 2")
            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            committed: dict[int, float] = {}
            start = time.perf_counter()
            for i in range(N):
                target = start + i / RATE
                delay = target - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                conn.execute("INSERT INTO ev VALUES (?, ?)", (i, time.time()))
                committed[i] = time.time()
            conn.close()
            wait_until(lambda: len(arrivals) == N, 60, "all rows on node 2")
            done.set()
            poller.join(5)
            rows = [(rid, arrivals[rid], w)
                    for rid, w in b.query("SELECT id, written FROM ev WHERE id >= 0")]
            # From the application's commit returning on node 1 to the row committed on node 2.
            lags = [(at - committed[i]) * 1000 for i, at, _ in rows]
            # Including the time the application's own INSERT took on node 1.
            lags_w = [(at - written) * 1000 for _, at, written in rows]
            floor = [x * 1000 for x in asyncio.run(floor_latency(server.url))]
        finally:
            for n in nodes:
                n.stop()
            server.stop()
    # Arrivals are polled every 0.5 ms: figures are +0.5 ms.
    p50, p99, mx = statistics.median(lags), pct(lags, 0.99), max(lags)
    print(f"{N} single-row transactions at {RATE}/s: lag p50 {p50:.1f} ms, p99 {p99:.1f} ms, "
          f"max {mx:.1f} ms")
    print(f"  including the application's INSERT on node 1: p50 {statistics.median(lags_w):.1f} ms,"
          f" p99 {pct(lags_w, 0.99):.1f} ms")
    print(f"floor (core NATS publish->receive at the same rate): p50 {statistics.median(floor):.2f}"
          f" ms, p99 {pct(floor, 0.99):.2f} ms")
    print(f"RESULT replication_lag rate={RATE} p50_ms={p50:.1f} p99_ms={p99:.1f} "
          f"floor_p99_ms={pct(floor, 0.99):.2f} target<=25 {'PASS' if p99 <= 25 else 'FAIL'}")


if __name__ == "__main__":
    main()
