"""Schema changes replicated as statements (``replicate_ddl = true``): capture and history.

Two tables, both in the database (so a snapshot carries them, and a restart knows where it was):

- ``__harmonylite__schema_seen``: the application's schema as this node last saw it (see
  :func:`harmonylite.cdc.schema_plan.objects`). A schema that differs from it is a change the
  application made here.
- ``__harmonylite__schema_changes``: every replicated schema change this node knows, in the
  order it met them: its id (``uid``, the same on every node), the node it comes from, the
  objects it changed (each one's definition before and after), the statements that replay it,
  and its state here:

  ``pending``  made here, not sent yet;  ``sent``  sent, not back from the stream yet;
  ``applied``  in this schema (made here and back from the stream, or applied from another
  node);  ``lost``  another node's change to the same objects came first in the stream (see
  ``replication.schema_apply``);  ``refused``  made here, but no statement reproduces it
  exactly (a virtual table module or a collation harmonylite's SQLite lacks): not sent;
  ``failed``  from another node, and this node could not apply it (the reason says why).

:func:`capture` compares the schema with the one last seen, in the caller's write transaction
(after capture was installed on the new tables), and records the difference as a ``pending``
change, whose statements were checked to reproduce the new schema exactly.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from harmonylite.cdc import ddl, schema_plan
from harmonylite.cdc.schema import table_info
from harmonylite.cdc.schema_plan import Obj, Objects, PlanError
from harmonylite.db.connection import PREFIX, quote_ident, write_transaction

log = logging.getLogger(__name__)

SEEN = f"{PREFIX}schema_seen"
CHANGES = f"{PREFIX}schema_changes"
TABLES_DDL = [
    f"CREATE TABLE IF NOT EXISTS {SEEN} (name TEXT PRIMARY KEY, ord INTEGER NOT NULL, "
    "type TEXT NOT NULL, tbl_name TEXT NOT NULL, sql TEXT NOT NULL) WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS {CHANGES} (id INTEGER PRIMARY KEY, uid TEXT NOT NULL UNIQUE, "
    "origin INTEGER NOT NULL, state TEXT NOT NULL, objects TEXT NOT NULL, stmts TEXT NOT NULL, "
    "reason TEXT, created_at REAL NOT NULL)",
]
# Before/after definitions of each object a change touches (None: absent).
Touched = dict[str, tuple[Obj | None, Obj | None]]


@dataclass(frozen=True)
class SchemaChange:
    id: int
    uid: str
    origin: int
    state: str
    objects: Touched
    stmts: list[str]
    reason: str
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "uid": self.uid, "origin": self.origin, "state": self.state,
                "objects": sorted(self.objects), "statements": self.stmts,
                "reason": self.reason, "created_at": self.created_at}


def ensure(conn: sqlite3.Connection) -> None:
    for stmt in TABLES_DDL:
        conn.execute(stmt)


def installed(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_schema WHERE name = ?",
                        (CHANGES,)).fetchone() is not None


def current(conn: sqlite3.Connection, replicated: Callable[[str], bool] | None) -> Objects:
    """The replicated part of the application's schema (views always count)."""
    objs = schema_plan.objects(conn)
    if replicated is None:
        return objs
    return {n: o for n, o in objs.items() if o.type == "view" or replicated(o.tbl_name)}


def seen(conn: sqlite3.Connection) -> Objects | None:
    if conn.execute(f"SELECT 1 FROM {ddl.STATE} WHERE k = 'schema_seen'").fetchone() is None:
        return None
    return {str(n): Obj(str(t), str(n), str(tb), str(s)) for n, t, tb, s in conn.execute(
        f"SELECT name, type, tbl_name, sql FROM {SEEN} ORDER BY ord")}


def remember(conn: sqlite3.Connection, objs: Objects) -> None:
    conn.execute(f"DELETE FROM {SEEN}")
    conn.executemany(f"INSERT INTO {SEEN}(name, ord, type, tbl_name, sql) VALUES (?, ?, ?, ?, ?)",
                     [(o.name, i, o.type, o.tbl_name, o.sql) for i, o in enumerate(objs.values())])
    conn.execute(f"INSERT OR IGNORE INTO {ddl.STATE}(k, v) VALUES ('schema_seen', 1)")


def touched(before: Objects, after: Objects) -> Touched:
    return {n: (before.get(n), after.get(n)) for n in list(before) + list(after)
            if before.get(n) != after.get(n)}


def encode_touched(t: Touched) -> str:
    return json.dumps({n: [b.as_list() if b else None, a.as_list() if a else None]
                       for n, (b, a) in t.items()})


def decode_touched(text: str | dict[str, Any]) -> Touched:
    raw = json.loads(text) if isinstance(text, str) else text

    def obj(v: Any) -> Obj | None:
        return Obj(str(v[0]), str(v[1]), str(v[2]), str(v[3])) if v else None
    return {str(n): (obj(b), obj(a)) for n, (b, a) in raw.items()}


def record(conn: sqlite3.Connection, uid: str, origin: int, state: str, objs: Touched,
           stmts: list[str], reason: str = "") -> None:
    conn.execute(
        f"INSERT INTO {CHANGES}(uid, origin, state, objects, stmts, reason, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(uid) DO UPDATE SET state = excluded.state, "
        "reason = excluded.reason",
        (uid, origin, state, encode_touched(objs), json.dumps(stmts), reason or None,
         time.time()))


def set_state(conn: sqlite3.Connection, uid: str, state: str, reason: str = "") -> None:
    conn.execute(f"UPDATE {CHANGES} SET state = ?, reason = ? WHERE uid = ?",
                 (state, reason or None, uid))


def capture(conn: sqlite3.Connection, node_id: int,
            replicated: Callable[[str], bool] | None) -> SchemaChange | None:
    """Record the application's schema change since the last look (in the caller's write
    transaction); None when there is none. The first look only remembers the schema."""
    ensure(conn)
    before = seen(conn)
    after = current(conn, replicated)
    if before is None:
        remember(conn, after)
        return None
    if before == after:
        return None
    objs = touched(before, after)
    uid = secrets.token_hex(8)
    try:
        stmts = schema_plan.plan(before, after)
        state, reason = "pending", ""
    except PlanError as exc:
        stmts, state, reason = [], "refused", str(exc)
    record(conn, uid, node_id, state, objs, stmts, reason)
    remember(conn, after)
    names = ", ".join(sorted(objs))
    if state == "refused":
        log.error("schema change of %s is not replicated: it cannot be replayed exactly (%s); "
                  "make the same change on every node by hand", names, reason,
                  extra={"schema_change": uid})
    else:
        log.info("schema change of %s captured: %d statements to replay on the other nodes",
                 names, len(stmts), extra={"schema_change": uid})
    return get(conn, uid)


def capture_now(conn: sqlite3.Connection, node_id: int,
                replicated: Callable[[str], bool] | None) -> SchemaChange | None:
    """:func:`capture` in a write transaction of its own."""
    with write_transaction(conn):
        return capture(conn, node_id, replicated)


def _row(row: tuple[Any, ...]) -> SchemaChange:
    ident, uid, origin, state, objs, stmts, reason, created = row
    return SchemaChange(int(ident), str(uid), int(origin), str(state), decode_touched(objs),
                        list(json.loads(stmts)), str(reason or ""), float(created))


_COLS = "id, uid, origin, state, objects, stmts, reason, created_at"


def get(conn: sqlite3.Connection, uid: str) -> SchemaChange | None:
    row = conn.execute(f"SELECT {_COLS} FROM {CHANGES} WHERE uid = ?", (uid,)).fetchone()
    return _row(row) if row else None


def rows(conn: sqlite3.Connection, *states: str) -> list[SchemaChange]:
    if not installed(conn):
        return []
    where = f" WHERE state IN ({', '.join('?' for _ in states)})" if states else ""
    return [_row(r) for r in conn.execute(
        f"SELECT {_COLS} FROM {CHANGES}{where} ORDER BY id", states)]


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    if not installed(conn):
        return {}
    return {str(s): int(n) for s, n in conn.execute(
        f"SELECT state, count(*) FROM {CHANGES} GROUP BY state")}


def republish(conn: sqlite3.Connection, table: str) -> int:
    """Capture every row of ``table`` again (its rows are published under the schema it has
    now); returns how many."""
    found = conn.execute(f"SELECT tid FROM {ddl.TABLES} WHERE name = ?", (table,)).fetchone()
    info = table_info(conn, table)
    if found is None or info.content_keyed:
        return 0  # (rows without a key, sent again, would be added again)
    return int(conn.execute(ddl.backfill_sql(int(found[0]), info)).rowcount)


def republish_in_flight(conn: sqlite3.Connection, table: str, after: int) -> int:
    """Capture again the rows of ``table`` whose change-log entries above ``after`` (this
    node's changes not yet back from the stream) are still kept: published before a schema
    change reached this node, they went out under the old schema; sent again, they go out under
    the new one. Returns how many."""
    found = conn.execute(f"SELECT tid, pk FROM {ddl.TABLES} WHERE name = ?", (table,)).fetchone()
    if found is None or table_info(conn, table).content_keyed:
        return 0  # (rows without a key, sent again, would be added again)
    keys = ", ".join(ddl.key_column(i) for i in range(len(json.loads(found[1]))))
    if not keys:
        return 0
    return int(conn.execute(
        f"INSERT INTO {ddl.LOG}(tid, op, {keys}) SELECT DISTINCT tid, {ddl.OP_BACKFILL}, {keys} "
        f"FROM {ddl.LOG} WHERE tid = ? AND id > ?", (int(found[0]), after)).rowcount)


def _columns(sql: str) -> set[str]:
    conn = sqlite3.connect(":memory:")
    try:
        conn.execute(sql)
        name = conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'").fetchone()[0]
        return {str(r[1]) for r in conn.execute(f"PRAGMA table_xinfo({quote_ident(name)})")}
    except sqlite3.Error:
        return set()  # (a virtual table: its columns are its module's)
    finally:
        conn.close()


def removed_columns(conn: sqlite3.Connection, table: str) -> set[str]:
    """Columns of ``table`` that replicated schema changes applied here removed (dropped, or
    renamed away): a change that still carries them was written before the change reached
    its sender."""
    out: set[str] = set()
    for change in rows(conn, "applied"):
        before, after = change.objects.get(table, (None, None))
        if before is not None and after is not None and before.type == "table":
            out |= _columns(before.sql) - _columns(after.sql)
    return out
