"""Rolling schema migrations, run by each node's application in turn (profile ``schema``)."""

from __future__ import annotations

import random
import sqlite3
import time
from typing import TYPE_CHECKING

from . import schema

if TYPE_CHECKING:
    from .workload import Effect, History

STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ADD COLUMN", ("ALTER TABLE mig ADD COLUMN c",)),
    ("RENAME COLUMN", ("ALTER TABLE mig RENAME COLUMN b TO b2",)),
    ("DROP COLUMN", ("ALTER TABLE mig DROP COLUMN a",)),
    ("CREATE TABLE then fill", ("CREATE TABLE fresh(id INTEGER PRIMARY KEY, v)",)),
    ("table rebuild", (
        "CREATE TABLE mig_new(id INTEGER PRIMARY KEY, b2, c, d DEFAULT 0)",
        "INSERT INTO mig_new(id, b2, c) SELECT id, b2, c FROM mig",
        "DROP TABLE mig",
        "ALTER TABLE mig_new RENAME TO mig",
    )),
)
FRESH_STEP = 3


def reached(conn: sqlite3.Connection, step: int) -> bool:
    """Whether this database has the schema the migrations before ``step`` leave (profile
    ``ddl``: they ran on other nodes, and arrive through replication)."""
    cols = set(schema.columns(conn, "mig"))
    have_fresh = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'fresh'").fetchone()
    return [
        True, "c" in cols, "b2" in cols, "a" not in cols and "b2" in cols,
        have_fresh is not None,
    ][step]


def run_step(conn: sqlite3.Connection, step: int, node_id: int, history: History,
             framework: bool = False) -> bool:
    """Run one migration in its own transaction, retrying while the database is busy; with
    ``framework``, as a framework does: the migration recorded in the bookkeeping table and its
    model's row created when missing, in the same transaction. True when it committed."""
    name, stmts = STEPS[step]
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.execute("BEGIN IMMEDIATE")
            break
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                history.count(f"migration {name!r} never got the write lock")
                return False
    try:
        for stmt in stmts:
            conn.execute(stmt)
        if framework:
            conn.execute(f"INSERT INTO {schema.BOOKKEEPING}(app, name, applied) "
                         "VALUES ('app', ?, datetime('now'))", (name,))
            conn.execute("INSERT OR IGNORE INTO fw_content_type(app_label, model) "
                         "VALUES ('app', ?)", (f"model_{name}",))
        effects: list[Effect] = []
        if step == FRESH_STEP:  # fill at once, in the creating transaction
            for i in range(20):
                rid = node_id * 1000 + i
                conn.execute("INSERT INTO fresh VALUES (?, ?)", (rid, f"n{node_id}-{i}"))
                effects.append((("fresh", (f"integer:{rid}",)),
                                (f"integer:{rid}", "text:x'" + f"n{node_id}-{i}".encode().hex()
                                 .upper() + "'")))
        conn.execute("COMMIT")
        history.record(node_id, effects)
        history.count(f"migration {name}")
        return True
    except sqlite3.DatabaseError as exc:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        history.count(f"APP ERROR migration {name!r}: {exc}")
        return False


def mig_statement(conn: sqlite3.Connection, rng: random.Random, rid: int
                  ) -> tuple[str, list[object]]:
    """An insert, update or delete of ``mig`` using the columns this node has now."""
    cols = [c for c in schema.columns(conn, "mig") if c != "id"]
    kind = rng.choice(("insert", "insert", "update", "delete"))
    vals: list[object] = [rng.randint(0, 999) for _ in cols]
    if kind == "insert":
        names = ", ".join(['"id"', *(f'"{c}"' for c in cols)])
        marks = ", ".join("?" * (len(cols) + 1))
        return f"INSERT OR IGNORE INTO mig({names}) VALUES ({marks})", [rid, *vals]
    if kind == "update" and cols:
        sets = ", ".join(f'"{c}" = ?' for c in cols)
        return f'UPDATE mig SET {sets} WHERE "id" = ?', [*vals, rid]
    return 'DELETE FROM mig WHERE "id" = ?', [rid]
