"""Parked changes: incoming changes this database cannot take yet, kept in order per table.

A change is parked when its table does not exist here, or when it carries a column this table
lacks (a rolling migration: the sender migrated first). Once a table has parked changes, every
later change to it is parked behind them, so applying them in arrival order gives the same rows
as applying them when they came. Nothing is dropped: the parked queue of a table is applied as
soon as its changes fit — the table created, the column added (the node notices the schema
change without a restart).

One more way out keeps a table from waiting for ever when the receiver dropped a column first:
a parked change whose extra columns its *sender* no longer sends (a later parked change from the
same origin fits this table) is applied without those columns, which its sender dropped too.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from harmonylite.cdc import ddl, schema_changes
from harmonylite.db.connection import savepoint
from harmonylite.node_ids import from_sqlite, to_sqlite
from harmonylite.replication.event import Batch, RowChange, dumps_values, loads_values
from harmonylite.replication.outcome import is_transient
from harmonylite.replication.settle import Settle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Parked:
    id: int
    stream: str
    seq: int
    origin: int | None
    table: str
    op: int
    columns: tuple[str, ...]
    keys: tuple[str, ...]
    values: tuple[object, ...]

    def batch(self) -> Batch:
        return Batch(self.origin or 0, {self.table: self.columns}, {self.table: self.keys}, [])

    def change(self) -> RowChange:
        return RowChange(self.table, self.op, self.values)


def ensure_origin_column(conn: sqlite3.Connection) -> None:
    """Databases parked into before the origin was recorded get the column (NULL there)."""
    cols = {c[1] for c in conn.execute(f"PRAGMA table_info({ddl.PARKED})")}
    if "origin" not in cols:
        conn.execute(f"ALTER TABLE {ddl.PARKED} ADD COLUMN origin INTEGER")


def park(conn: sqlite3.Connection, stream: str, seq: int, batch: Batch, ch: RowChange) -> None:
    conn.execute(
        f"INSERT INTO {ddl.PARKED}(stream, seq, origin, tbl, op, columns, keys, vals) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (stream, seq, to_sqlite(batch.node_id), ch.table, ch.op,
         json.dumps(batch.columns[ch.table]), json.dumps(batch.keys[ch.table]),
         dumps_values(ch.values)),
    )


def parked_tables(conn: sqlite3.Connection) -> set[str]:
    return {str(t) for (t,) in conn.execute(f"SELECT DISTINCT tbl FROM {ddl.PARKED}")}


def counts(conn: sqlite3.Connection) -> dict[str, int]:
    try:
        rows = conn.execute(f"SELECT tbl, count(*) FROM {ddl.PARKED} GROUP BY tbl").fetchall()
    except sqlite3.OperationalError:  # not installed yet
        return {}
    return {str(t): int(n) for t, n in rows}


def _queues(conn: sqlite3.Connection) -> dict[str, list[Parked]]:
    queues: dict[str, list[Parked]] = {}
    for pid, stream, seq, origin, table, op, cols, keys, vals in conn.execute(
            f"SELECT id, stream, seq, origin, tbl, op, columns, keys, vals FROM {ddl.PARKED} "
            "ORDER BY id"):
        queues.setdefault(str(table), []).append(Parked(
            int(pid), str(stream), int(seq), from_sqlite(origin), str(table), int(op),
            tuple(json.loads(cols)), tuple(json.loads(keys)), loads_values(vals)))
    return queues


# Applies one parked change; ``subset`` allows columns this table lacks (left out). Returns
# False when the change cannot be applied (it stays parked, and its table's queue waits).
ApplyParked = Callable[[Parked, bool], bool]


def release(conn: sqlite3.Connection, columns_of: Callable[[str], set[str] | None],
            apply: ApplyParked, gone: Callable[[str], set[str]] | None = None) -> int:
    """Apply, table by table and in arrival order, the parked changes that fit now; stop a
    table's queue at the first that does not. Returns how many were applied. ``gone`` names
    a table's columns that replicated schema changes removed here: a change that carries only
    those besides this table's columns was written before the change reached its sender, and
    is applied without them."""
    done: list[tuple[int]] = []
    for table, queue in _queues(conn).items():
        local = columns_of(table)
        if local is None:
            continue
        removed: set[str] | None = None
        for i, item in enumerate(queue):
            fits = set(item.columns) <= local
            dropped_by_sender = not fits and any(
                later.origin == item.origin and set(later.columns) <= local
                for later in queue[i + 1:])
            if not fits and not dropped_by_sender and gone is not None:
                removed = gone(table) if removed is None else removed
                dropped_by_sender = set(item.columns) - local <= removed
            if not (fits or dropped_by_sender) or not apply(item, dropped_by_sender):
                break
            done.append((item.id,))
    conn.executemany(f"DELETE FROM {ddl.PARKED} WHERE id = ?", done)
    return len(done)


class ParkedChanges:
    """The applier's part for parked changes: which tables have some (every later change to
    them is parked behind), and their release once they fit and the schema has settled
    (``settle``). Used on the writer's thread, inside the applier's write transactions."""

    def __init__(self, settle: Settle, *, replicate_ddl: bool = False) -> None:
        self.settle = settle
        # Replicated schema changes: a change may carry only columns such a change removed
        # here (see ``release``).
        self.replicate_ddl = replicate_ddl
        self.tables: set[str] = set()  # tables with parked changes, as last read or parked

    def __bool__(self) -> bool:
        return bool(self.tables)

    def reload(self, conn: sqlite3.Connection) -> None:
        self.tables = parked_tables(conn)

    def park(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
             ch: RowChange, *, table_here: bool, fits: bool) -> None:
        """Keep ``ch`` in order until this database can take it (``table_here``: the table
        exists; ``fits``: it has every column the change carries)."""
        park(conn, stream, seq, batch, ch)
        self.tables.add(ch.table)
        if table_here and (fits or self.replicate_ddl):
            # It may unblock changes parked before it; or (replicated schema changes) it may
            # carry only columns such a change removed here.
            self.settle.unpark_wanted = True

    def due(self) -> bool:
        return self.settle.due(self.tables)

    def next_due(self) -> float | None:
        """Seconds until deferred work (parked changes, dead letters a schema change may let
        in) is due (0: now), None when none waits."""
        return self.settle.next_due(self.tables)

    def transaction_started(self) -> None:
        self.settle.transaction_started(self.tables)

    def transaction_committed(self) -> None:
        self.settle.transaction_committed(self.tables)

    def unpark(self, conn: sqlite3.Connection, columns_of: Callable[[str], set[str] | None],
               apply_change: Callable[[Parked], object]) -> int:
        """Apply, in arrival order, the parked changes that fit this database now, each with
        ``apply_change`` under a savepoint; one that fails stays parked with the later changes
        to its table. A transient error is raised. Returns how many applied."""
        self.settle.unparking()

        def apply_one(item: Parked, subset: bool) -> bool:
            try:
                with savepoint(conn, "parked"):
                    apply_change(item)
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.error("parked change from %s sequence %d to table %r cannot be applied; it "
                          "and the later changes to that table stay parked: %s", item.stream,
                          item.seq, item.table, exc, extra={"table": item.table})
                return False
            return True

        def gone(table: str) -> set[str]:
            return schema_changes.removed_columns(conn, table)

        applied = release(conn, columns_of, apply_one, gone if self.replicate_ddl else None)
        self.reload(conn)
        if applied:
            log.info("applied %d parked changes now that this database can take them", applied)
        return applied
