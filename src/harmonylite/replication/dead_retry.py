"""Dead letters a schema change may let in: applied again once the schema accepts them.

A change refused by a stricter schema (a NOT NULL column its sender did not have) is applied
again after a schema change, when its row is still absent here: a row written since supersedes
it (the dead letter stays for the operator). A whole message that is no batch is the operator's
to retry. Runs in the caller's write transaction, as the replicator's own writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import fetch_all, savepoint
from harmonylite.errors import DecodeError
from harmonylite.replication import deadletter
from harmonylite.replication.event import Batch, RowChange, decode
from harmonylite.replication.outcome import is_transient
from harmonylite.replication.settle import Settle

# Applies one change of a dead letter (stream, sequence, its batch, the change).
ApplyOne = Callable[[str, int, Batch, RowChange], object]


def waiting(conn: sqlite3.Connection) -> list[deadletter.DeadLetter]:
    """The dead letters a stricter schema refused."""
    return [d for d in deadletter.rows(conn)
            if d.table and "NOT NULL constraint failed" in d.error]


def retry(conn: sqlite3.Connection, letters: list[deadletter.DeadLetter],
          local: Callable[[str], TableInfo | None], apply_one: ApplyOne) -> int:
    """Apply ``letters`` again where their row is still absent; each applied one is deleted.
    Returns how many applied. A transient error is raised (everything is retried later)."""
    applied = 0
    for d in letters:
        try:
            batch = decode(d.payload)
        except DecodeError:
            continue  # a whole message that is no batch: its retry is the operator's
        ch = batch.changes[0]
        table = local(ch.table)
        if table is None or ch.op == ddl.OP_DELETE:
            continue
        cols = batch.columns[ch.table]
        if not all(c in cols for c in table.pk):
            continue
        key = tuple(ch.values[cols.index(c)] for c in table.pk)
        where = " AND ".join(f'"{c}" IS ?' for c in table.pk)
        if fetch_all(conn, f'SELECT 1 FROM "{ch.table}" WHERE {where}', key):
            continue
        try:
            with savepoint(conn, "dead"):
                apply_one(d.stream, d.seq, batch, ch)
        except Exception as exc:
            if is_transient(exc):
                raise
            continue
        deadletter.delete(conn, d.id)
        applied += 1
    return applied


class DeadRetry:
    """The applier's part for the retry: due once the schema has settled (``settle``), as the
    parked changes are."""

    def __init__(self, settle: Settle) -> None:
        self.settle = settle

    def due_letters(self, conn: sqlite3.Connection) -> list[deadletter.DeadLetter]:
        """The dead letters to retry now (none while the schema is still moving: the retry is
        then noted as wanted once it has settled)."""
        if self.settle.wait() > 0:
            self.settle.dead_retry_wanted = True
            return []
        self.settle.dead_retry_wanted = False
        return waiting(conn)
