"""A steady write workload over real nodes, and the longest write→visible gap it saw.

One writer thread per node inserts a row every ``period`` seconds (ids ``node * 10**7 + n``);
one probe thread reads every node's highest id per writer and records, for each row that became
visible on another node, how long after its write that was. ``window()`` returns the longest gap
seen since the previous call: the stall a fault caused.
"""

from __future__ import annotations

import sqlite3
import threading
import time

from nodes import NodeProc, wait_until

SCHEMA = "CREATE TABLE w(id INTEGER PRIMARY KEY, node INTEGER, n INTEGER)"
STRIDE = 10**7


class Workload:
    def __init__(self, nodes: list[NodeProc], period: float = 0.05) -> None:
        self.nodes = nodes
        self.period = period
        self.written: dict[int, list[float]] = {n.node_id: [] for n in nodes}
        self.errors: dict[int, str] = {}
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._worst = 0.0
        self._seen: dict[tuple[int, int], int] = {}  # (writer, reader) -> highest n visible

    def start(self) -> Workload:
        for node in self.nodes:
            t = threading.Thread(target=self._write, args=(node,), daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._probe, daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def _write(self, node: NodeProc) -> None:
        conn = sqlite3.connect(node.db, isolation_level=None, timeout=30)
        try:
            times = self.written[node.node_id]
            while not self._stop.wait(self.period):
                n = len(times)
                try:
                    conn.execute("INSERT INTO w VALUES (?, ?, ?)",
                                 (node.node_id * STRIDE + n, node.node_id, n))
                except sqlite3.OperationalError as exc:  # a test holding the write lock
                    self.errors[node.node_id] = str(exc)
                    continue
                times.append(time.monotonic())
        finally:
            conn.close()

    def _probe(self) -> None:
        conns = {n.node_id: sqlite3.connect(n.db, isolation_level=None, timeout=30)
                 for n in self.nodes}
        try:
            while not self._stop.wait(0.1):
                for reader, conn in conns.items():
                    try:
                        tops = conn.execute("SELECT node, max(n) FROM w GROUP BY node").fetchall()
                    except sqlite3.OperationalError:
                        continue
                    now = time.monotonic()
                    for writer, top in tops:
                        if writer == reader or writer not in self.written:
                            continue
                        before = self._seen.get((writer, reader), -1)
                        if top > before:
                            times = self.written[writer]
                            oldest = times[before + 1] if before + 1 < len(times) else now
                            with self._lock:
                                self._worst = max(self._worst, now - oldest)
                            self._seen[(writer, reader)] = top
        finally:
            for conn in conns.values():
                conn.close()

    def window(self) -> float:
        """The longest write→visible gap since the last call, in seconds."""
        with self._lock:
            worst, self._worst = self._worst, 0.0
        return worst

    def counts(self) -> dict[int, int]:
        return {w: len(t) for w, t in self.written.items()}

    def wait_visible(self, timeout: float, what: str) -> None:
        """Until every node holds every row written so far (nothing lost, nothing extra)."""
        target = self.counts()
        want = sum(target.values())

        def caught_up() -> bool:
            for node in self.nodes:
                for writer, count in target.items():
                    have = node.query("SELECT count(*) FROM w WHERE node = ? AND n < ?",
                                      (writer, count))[0][0]
                    if have != count:  # every row written so far, none missing in the middle
                        return False
            return True

        wait_until(caught_up, timeout, f"{what}: every node to hold the {want} rows written")
