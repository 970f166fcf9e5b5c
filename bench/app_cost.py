"""The application's cost of running a node: single-row autocommit inserts (WAL,
``synchronous=NORMAL``) into a database whose node runs and replicates to a second node, against
the same inserts into a database without harmonylite, interleaved in the same run.

Two figures, each the median of same-round ratios:

- **flat out**: rows/s of an application inserting as fast as it can for 3 s;
- **paced** (``--rate``, 1,000/s by default): the mean time of one insert's ``execute`` while the
  application inserts at that rate (what an application with ordinary traffic waits per write).

Within a round the two sides alternate in six slices each (0.5 s flat out, 500 inserts paced),
each slice followed by a wait until node 2 has every row (not counted), so a change of the shared
machine's load during the round weighs on both sides alike and the node's work on one slice does
not spill into a plain one.

``--profile DIR`` records node 1 and node 2 with py-spy during the flat-out round (speedscope
JSON, plus a top-of-profile summary printed here). Target: >= 0.6x (goal 0.8).

Before the measured inserts the application writes 2,500 rows at 1,000/s on the node's database
(not counted), so the node is past its start-up.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nodes import NodeProc, wait_until  # noqa: E402
from servers import NatsServer  # noqa: E402

TABLE = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, note TEXT)"
FLAT_SECONDS = 3.0  # flat out, each side, in FLAT_SLICES slices
FLAT_SLICES = 6
PACED_ROWS = 3_000  # each side, in PACED_SLICES slices
PACED_SLICES = 6
WARM_UP = 2_500  # rows at the paced rate before the measured ones (the node past its start)


def _open(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def _flat(conn: sqlite3.Connection, start: int, seconds: float) -> tuple[int, float]:
    """Inserts as fast as possible for ``seconds``: (rows, seconds taken)."""
    sql = "INSERT INTO t VALUES (?, ?, ?, ?, ?)"
    t0 = time.perf_counter()
    nxt = start
    while True:
        for i in range(nxt, nxt + 100):
            conn.execute(sql, (i, f"item {i}", i % 97, i * 0.5, "some note text"))
        nxt += 100
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return nxt - start, elapsed


def _paced(conn: sqlite3.Connection, start: int, rows: int, rate: float) -> float:
    """``rows`` inserts at ``rate``: the seconds spent in their ``execute`` calls."""
    sql = "INSERT INTO t VALUES (?, ?, ?, ?, ?)"
    spent = 0.0
    t0 = time.perf_counter()
    for n, i in enumerate(range(start, start + rows)):
        due = t0 + n / rate
        now = time.perf_counter()
        if due > now:
            time.sleep(due - now)
        a = time.perf_counter()
        conn.execute(sql, (i, f"item {i}", i % 97, i * 0.5, "some note text"))
        spent += time.perf_counter() - a
    return spent


def _spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("  (py-spy not found: no profile)")
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--rate", "200", "--format",
                             "raw", "--output", str(out), "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _summary(raw: Path, top: int = 25) -> None:
    """Self and total share of the hottest functions in a py-spy raw (collapsed) profile."""
    if not raw.exists():
        return
    total = 0
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        n = int(count)
        total += n
        frames = stack.split(";")
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + n
        own[frames[-1]] = own.get(frames[-1], 0) + n
    print(f"  {raw.name}: {total} samples; by self time:")
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {100 * n / total:5.1f}% self {100 * inclusive[f] / total:5.1f}% total  {f}")


class Pair:
    """Two nodes replicating the application's database, and a plain database beside them."""

    def __init__(self, base: Path, server: NatsServer, r: int) -> None:
        self.nodes = []
        for i in (1, 2):
            node = NodeProc(base / f"r{r}n{i}", i, {"nats": {"urls": [server.url],
                                                             "stream_prefix": f"app{r}",
                                                             "subject_prefix": f"app{r}"}})
            conn = _open(node.db)
            conn.execute(TABLE)
            conn.close()
            self.nodes.append(node.start())
        plain_path = base / f"plain{r}.db"
        self.plain = _open(plain_path)
        self.plain.execute(TABLE)
        self.app = _open(self.nodes[0].db)
        self.probe = self.nodes[1].connect()
        self.next = 0

    def settle(self) -> None:
        """Until node 2 has every row node 1's application wrote: the node's work on one slice
        does not spill into the next (plain) one."""
        total = self.app.execute("SELECT count(*) FROM t").fetchone()[0]
        wait_until(lambda: self.probe.execute("SELECT count(*) FROM t").fetchone()[0] == total,
                   120, "all rows on node 2")

    def close(self) -> None:
        for c in (self.plain, self.app, self.probe):
            c.close()
        for n in self.nodes:
            n.stop()


def one_round(base: Path, server: NatsServer, r: int, rate: float,
              profile: Path | None = None) -> tuple[float, float, str]:
    """(flat-out ratio, paced ratio, line to print): plain and node slices alternate, so a
    change of the machine's load in the round weighs on both sides alike."""
    pair = Pair(base, server, r)
    spies = []
    try:
        if profile is not None:
            profile.mkdir(parents=True, exist_ok=True)
            for n in pair.nodes:
                assert n.proc is not None
                out = profile / f"node{n.node_id}.txt"
                spies.append((_spy(n.proc.pid, out), out))
            time.sleep(1)  # py-spy attaches
        # The node past its start-up (its first schema look, the settling of its applier): the
        # application's first seconds are not what it pays for good.
        _paced(pair.app, 10_000_000, WARM_UP, 1000.0)
        _paced(pair.plain, 10_000_000, WARM_UP, 1000.0)
        pair.settle()
        flat = {"plain": [0, 0.0], "node": [0, 0.0]}
        for _ in range(FLAT_SLICES):
            for side, conn in (("plain", pair.plain), ("node", pair.app)):
                rows, took = _flat(conn, pair.next, FLAT_SECONDS / FLAT_SLICES)
                pair.next += rows
                flat[side][0] += rows
                flat[side][1] += took
                pair.settle()
        paced = {"plain": 0.0, "node": 0.0}
        per = PACED_ROWS // PACED_SLICES
        for _ in range(PACED_SLICES):
            for side, conn in (("plain", pair.plain), ("node", pair.app)):
                paced[side] += _paced(conn, pair.next, per, rate)
                pair.next += per
                pair.settle()
    finally:
        for spy, _ in spies:
            if spy is not None:
                spy.send_signal(2)
                spy.wait(30)
        pair.close()
    for _, out in spies:
        _summary(out)
    a = flat["plain"][0] / flat["plain"][1]
    b = flat["node"][0] / flat["node"][1]
    c, d = paced["plain"] / PACED_ROWS, paced["node"] / PACED_ROWS
    line = (f"  round {r} flat out: plain {a:,.0f} rows/s, with nodes {b:,.0f} rows/s = "
            f"x{b / a:.2f}; at {rate:,.0f}/s: plain {c * 1e6:.0f} us/insert, with nodes "
            f"{d * 1e6:.0f} us/insert = x{c / d:.2f}  (load {load()})")
    return b / a, c / d, line


def load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def measure(rounds: int, rate: float, profile: Path | None = None) -> dict[str, float]:
    flat: list[float] = []
    paced: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        server = NatsServer(base / "nats").start()
        try:
            for r in range(rounds):
                f, p, line = one_round(base, server, r, rate, profile if r == 0 else None)
                flat.append(f)
                paced.append(p)
                print(line, flush=True)
        finally:
            server.stop()
    return {"flat": statistics.median(flat), "paced": statistics.median(paced)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--profile", type=Path, default=None)
    args = ap.parse_args()
    got = measure(args.rounds, args.rate, args.profile)
    verdict = "PASS" if got["flat"] >= 0.6 else "FAIL"
    print(f"RESULT app_cost flat_out=x{got['flat']:.2f} paced_rate={args.rate:.0f} "
          f"paced=x{got['paced']:.2f} target>=0.60 {verdict} (load {load()})")


if __name__ == "__main__":
    main()
