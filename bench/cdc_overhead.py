"""CDC write overhead: single-row autocommit inserts (WAL, synchronous=NORMAL), with and without
harmonylite's triggers; HarmonyLite's per-table + global change-log layout for comparison.

Prints rows/s for each and the ratio to the plain table measured in the same round (median of
rounds). Target: harmonylite >= 0.6x.

Two measurements:
- triggers only, no node running (the cost of capture alone);
- the same inserts while a real node (and its nats-server) runs on the database: what an
  application sees in production. The node publishes as the rows come in, and checkpoints the WAL
  in the background, which takes that work out of the application's commits.
"""

from __future__ import annotations

import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from harmonylite.cdc.install import install  # noqa: E402

ROWS = 10_000
ROUNDS = 9
TABLE = "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, qty INTEGER, price REAL, note TEXT)"

# HarmonyLite's layout (per-table log + global log, guard via pragma_function_list).
HL_DDL = [
    "CREATE TABLE __harmonylite___change_log_global(id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "change_table_id INTEGER, table_name TEXT)",
    "CREATE TABLE __harmonylite__t_change_log(id INTEGER PRIMARY KEY AUTOINCREMENT, val_id, "
    "val_name, val_qty, val_price, val_note, type TEXT, created_at INTEGER, state INTEGER)",
    "CREATE TRIGGER __hl_t_ins AFTER INSERT ON t WHEN (SELECT COUNT(*) FROM pragma_function_list "
    "WHERE name = 'harmonylite_version') < 1 BEGIN INSERT INTO __harmonylite__t_change_log("
    "val_id, val_name, val_qty, val_price, val_note, type, created_at, state) VALUES (NEW.id, "
    "NEW.name, NEW.qty, NEW.price, NEW.note, 'insert', CAST((julianday('now') - 2440587.5) * "
    "86400 * 1000 AS INTEGER), 0); INSERT INTO __harmonylite___change_log_global(change_table_id,"
    " table_name) VALUES (last_insert_rowid(), 't'); END",
]


# Reference points: what any trigger-based capture must pay. A second B-tree touched per commit
# (an index on the plain table), and the smallest possible change log (a table of bare ids).
REFERENCE = {
    "plain+index": ["CREATE INDEX t_qty ON t(qty)"],
    "bare-id-log": ["CREATE TABLE __bare_log(id INTEGER PRIMARY KEY)",
                    "CREATE TRIGGER __bare AFTER INSERT ON t BEGIN "
                    "INSERT INTO __bare_log(id) VALUES (NULL); END"],
}


def run(path: Path, setup: str) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(TABLE)
    if setup.startswith("indexed"):
        # A table with a secondary index, as most application tables have.
        conn.execute("CREATE INDEX t_name ON t(name)")
    if setup in ("harmonylite", "indexed+harmonylite"):
        install(conn)
    elif setup == "harmonylite-go-layout":
        for stmt in HL_DDL:
            conn.execute(stmt)
    else:
        for stmt in REFERENCE.get(setup, []):
            conn.execute(stmt)
    start = time.perf_counter()
    for i in range(ROWS):
        conn.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                     (i, f"item {(i * 7919) % ROWS}", i % 97, i * 0.5, "some note text"))
    elapsed = time.perf_counter() - start
    conn.close()
    return ROWS / elapsed


def with_node(tmp: Path, r: int, server: object) -> float:
    """Rows/s of the application while a node runs on its database."""
    from nodes import NodeProc

    node = NodeProc(tmp / f"node-{r}", 1, {"nats": {"urls": [server.url],  # type: ignore[attr-defined]
                                                    "stream_prefix": f"b{r}",
                                                    "subject_prefix": f"b{r}"}})
    conn = sqlite3.connect(node.db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(TABLE)
    node.start()
    try:
        start = time.perf_counter()
        for i in range(ROWS):
            conn.execute("INSERT INTO t VALUES (?, ?, ?, ?, ?)",
                         (i, f"item {i}", i % 97, i * 0.5, "some note text"))
        return ROWS / (time.perf_counter() - start)
    finally:
        conn.close()
        node.stop()


def main() -> None:
    kinds = ["plain", "harmonylite", "harmonylite-go-layout", *REFERENCE, "indexed",
             "indexed+harmonylite"]
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    rates: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(ROUNDS):
            order = random.Random(r).sample(kinds, len(kinds))  # no variant always runs first
            got = {k: run(Path(tmp) / f"{k}-{r}.db", k) for k in order}
            for k in kinds:
                rates[k].append(got[k])
                base = got["indexed"] if k.startswith("indexed") else got["plain"]
                ratios[k].append(got[k] / base)
    print(f"single-row autocommit inserts, {ROWS} rows, median of {ROUNDS} rounds")
    for k in kinds:
        of = "indexed" if k.startswith("indexed") else "plain"
        print(f"  {k:24s} {statistics.median(rates[k]):10,.0f} rows/s   "
              f"x{statistics.median(ratios[k]):.2f} of {of}")
    with tempfile.TemporaryDirectory() as tmp:
        from servers import NatsServer

        server = NatsServer(Path(tmp) / "nats").start()
        live: list[float] = []
        try:
            for r in range(5):
                plain = run(Path(tmp) / f"plain-{r}.db", "plain")
                live.append(with_node(Path(tmp), r, server) / plain)
        finally:
            server.stop()
    print(f"  {'harmonylite, node running':24s} x{statistics.median(live):.2f} of plain "
          f"(median of 5 rounds: {', '.join(f'{x:.2f}' for x in live)})")
    ratio = statistics.median(ratios["harmonylite"])
    verdict = "PASS" if ratio >= 0.6 else "FAIL"  # the target is about the triggers' cost
    print(f"RESULT cdc_overhead ratio={ratio:.2f} (triggers only) target>=0.60 {verdict}; "
          f"indexed table {statistics.median(ratios['indexed+harmonylite']):.2f}; "
          f"with the node running {statistics.median(live):.2f}")


if __name__ == "__main__":
    main()
