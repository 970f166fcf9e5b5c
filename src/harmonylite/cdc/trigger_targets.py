"""Which tables each application trigger writes, as SQLite compiles it.

SQLite compiles a table's triggers into every statement that writes the table, and calls the
connection's authorizer for each table the compiled program inserts into, updates or deletes
from, naming the innermost trigger responsible. So preparing (``EXPLAIN``, which compiles and
never runs) one INSERT, one UPDATE of every column and one DELETE on each table, with an
authorizer recording those calls, gives each trigger's targets exactly: no parsing of the
trigger's SQL, nested triggers included (each reported under its own name), and what a virtual
table writes into its shadow tables left out (that happens inside the module, not in the
program).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field

from harmonylite.db.connection import PREFIX, quote_ident

_WRITES = frozenset({sqlite3.SQLITE_INSERT, sqlite3.SQLITE_UPDATE, sqlite3.SQLITE_DELETE})


@dataclass
class Targets:
    # trigger -> tables of the main database it writes (SQLite's own, sqlite_sequence…, left out)
    writes: dict[str, set[str]] = field(default_factory=dict)
    # table whose statements SQLite could not compile -> its error; its triggers are unknown
    failed: dict[str, str] = field(default_factory=dict)


def _probes(conn: sqlite3.Connection, table: str) -> list[str]:
    t = quote_ident(table)
    # Generated columns (hidden 2/3) cannot be assigned; hidden 1 (virtual tables) never occurs.
    cols = [str(c[1]) for c in conn.execute(f"PRAGMA table_xinfo({t})") if c[6] == 0]
    probes = [f"EXPLAIN INSERT INTO {t} DEFAULT VALUES", f"EXPLAIN DELETE FROM {t}"]
    if cols:
        sets = ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in cols)
        probes.append(f"EXPLAIN UPDATE {t} SET {sets}")
    return probes


def analyse(conn: sqlite3.Connection, tables: list[str]) -> Targets:
    """The tables each trigger on ``tables`` (and each trigger those fire) writes."""
    out = Targets()
    current: dict[str, set[str]] = {}

    def record(action: int, arg1: str | None, _arg2: str | None, db: str | None,
               trigger: str | None) -> int:
        if action in _WRITES and trigger and arg1 and db == "main" \
                and not arg1.startswith(("sqlite_", PREFIX)):
            current.setdefault(trigger, set()).add(arg1)
        return sqlite3.SQLITE_OK

    conn.set_authorizer(record)
    try:
        for table in tables:
            current.clear()
            try:
                for probe in _probes(conn, table):
                    conn.execute(probe).fetchall()
            except sqlite3.Error as exc:
                out.failed[table] = str(exc)
                continue
            for trigger, written in current.items():
                out.writes.setdefault(trigger, set()).update(written)
        # (``current`` is filled by the authorizer while each probe compiles.)
    finally:
        conn.set_authorizer(None)
    return out
