"""Writing large blobs without copies: a placeholder in the row, then the bytes in pieces.

Binding a 50 MB blob to an INSERT costs SQLite two copies of it (the bound value, then the
record it builds) on top of the decoded value. Instead the row is written with ``zeroblob(n)`` in
that column (SQLite builds no bytes for it) and the value is then written through SQLite's
incremental blob I/O, a megabyte at a time, straight into the pages. A stored value that already
equals the incoming one (a node's own change coming back) is compared the same way, in pieces,
and left alone.

Only for rowid tables (blob I/O needs a rowid), values that are blobs of at least
``LARGE_VALUE`` bytes and not part of the key, on tables without secondary UNIQUE constraints
(where a value may have to move between rows): everything else takes the ordinary path.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import cast

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import RawText, quote_ident
from harmonylite.replication import statements
from harmonylite.replication.event import LARGE_VALUE

PIECE = 1024 * 1024
_ROWID_NAMES = {"rowid", "oid", "_rowid_"}
# The applier's prepared statements: (table, columns, op, NULL mask, zeroblob mask) -> SQL.
Prepared = Callable[[TableInfo, tuple[str, ...], int, tuple[bool, ...] | None,
                     tuple[bool, ...] | None], statements.Statements]


def positions(local: TableInfo, columns: tuple[str, ...], values: tuple[object, ...]
              ) -> tuple[int, ...]:
    """Positions of the values to write in pieces (empty: the ordinary path)."""
    if local.unique_indexes or local.nullable_key or local.content_keyed:
        return ()
    big = tuple(i for i, v in enumerate(values) if type(v) is bytes and len(v) >= LARGE_VALUE)
    if not big or any(columns[i] in local.pk for i in big):
        return ()
    return big


def has_rowid(conn: sqlite3.Connection, local: TableInfo) -> bool:
    """Whether blob I/O can address the table's rows (not WITHOUT ROWID, no column that hides
    the rowid's names)."""
    if any(c.lower() in _ROWID_NAMES for c in local.columns):
        return False
    try:
        conn.execute(f"SELECT rowid FROM {quote_ident(local.name)} LIMIT 0")
    except sqlite3.OperationalError:
        return False
    return True


def rowid_of(conn: sqlite3.Connection, local: TableInfo, key: tuple[object, ...]) -> int | None:
    where = " AND ".join(
        f"{quote_ident(c)} IS CAST(? AS TEXT)" if type(v) is RawText else f"{quote_ident(c)} IS ?"
        for c, v in zip(local.pk, key, strict=True))
    row = conn.execute(f"SELECT rowid FROM {quote_ident(local.name)} WHERE {where}",
                       key).fetchone()
    return int(row[0]) if row else None


def stored_equal(conn: sqlite3.Connection, table: str, column: str, rowid: int,
                 value: bytes) -> bool:
    """Whether the row holds exactly ``value`` there (a blob), compared a piece at a time."""
    row = conn.execute(
        f"SELECT typeof({quote_ident(column)}), length({quote_ident(column)}) "
        f"FROM {quote_ident(table)} WHERE rowid = ?", (rowid,)).fetchone()
    if row is None or row[0] != "blob" or row[1] != len(value):
        return False
    view = memoryview(value)
    with conn.blobopen(table, column, rowid, readonly=True) as blob:
        for at in range(0, len(value), PIECE):
            if blob.read(PIECE) != view[at:at + PIECE]:
                return False
    return True


def write(conn: sqlite3.Connection, table: str, column: str, rowid: int, value: bytes) -> None:
    """Fill the ``zeroblob`` placeholder of the row with ``value``."""
    view = memoryview(value)
    with conn.blobopen(table, column, rowid) as blob:
        for at in range(0, len(value), PIECE):
            blob.write(view[at:at + PIECE])


def apply_change(conn: sqlite3.Connection, local: TableInfo, op: int, cols: tuple[str, ...],
                 vals: tuple[object, ...], key: tuple[object, ...], big: tuple[int, ...],
                 own: bool, prepared: Prepared) -> bool:
    """A change with large blobs: the row with ``zeroblob`` placeholders (or without the
    columns that already hold the same bytes), then the blobs in pieces.
    False, having written nothing, for an INSERT that meets a row of another node: the
    conflict rules record the whole row (the ordinary path)."""
    rowid = rowid_of(conn, local, key)
    if rowid is not None and op == ddl.OP_INSERT and not own:
        return False
    blobs = {i: cast(bytes, vals[i]) for i in big}
    fill = [i for i in big if rowid is None or not stored_equal(
        conn, local.name, cols[i], rowid, blobs[i])]
    kept = [i for i in range(len(cols)) if i not in blobs or i in fill]
    cols_k = tuple(cols[i] for i in kept)
    vals_k = tuple(len(blobs[i]) if i in fill else vals[i] for i in kept)
    zero = tuple(i in fill for i in kept)
    st = prepared(local, cols_k, op, statements.raw_mask(vals_k), zero)
    statements.run(conn, local, st, cols_k, vals_k, key)
    if not fill:
        return True
    rowid = rowid_of(conn, local, key)
    if rowid is None:  # the row was just written: not finding it is a bug, not a skip
        raise RuntimeError(f"the row of table {local.name!r} key {key!r} is not there "
                           "after writing it")
    for i in fill:
        write(conn, local.name, cols[i], rowid, blobs[i])
    return True

