"""A removal from a table without a primary key, met by this node's own changes in flight.

Such a table is a multiset identified by content: a change removes one row equal to it (none
when there is none) or adds one. Every change to a given content goes to the same shard, so the
stream orders them all. A node applies its own changes when its application makes them, before
the stream places them, so they arrive back after every change the stream put first; for
additions the order does not matter, for removals it does: a removal that finds no row does
nothing. When this node's own changes not yet come back took the count of that content down to
none at some point (for instance an update that wrote a row as it was: its old row removed, the
same row added), the removal coming first in the stream emptied it, and those changes, replayed
after it, leave exactly what this node holds now: the removal must not take another row here.
Otherwise the removal takes one row here as everywhere.
"""

from __future__ import annotations

import sqlite3

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import quote_ident
from harmonylite.replication import statements


def removal_absorbed(conn: sqlite3.Connection, local: TableInfo, tid: int, back: int,
                     key: tuple[object, ...]) -> bool:
    """Whether the removal of content ``key`` (every column, the table's order) is already
    accounted for by this node's own changes to that content with change ids above ``back``
    (not come back from the stream yet): in the stream's order it found the row that those
    changes, replayed after it, remove or find missing."""
    mask = statements.raw_mask(key)
    logged = statements.exact_match([f"k{i}" for i in range(len(key))], mask, first=3)
    ops = [int(r[0]) for r in conn.execute(
        f"SELECT op FROM {ddl.LOG} WHERE tid = ?1 AND id > ?2 AND {logged} ORDER BY id",
        (tid, back, *key))]
    ops = [op for op in ops if op != ddl.OP_BACKFILL]  # not the application's writes
    if not ops:
        return False
    held = statements.exact_match([quote_ident(c) for c in local.pk], mask)
    level = int(conn.execute(f"SELECT count(*) FROM {quote_ident(local.name)} WHERE {held}",
                             key).fetchone()[0])
    lowest = level
    for op in reversed(ops):  # the count of this content before each of them
        level += 1 if op == ddl.OP_DELETE else -1
        lowest = min(lowest, level)
    return lowest <= 0
