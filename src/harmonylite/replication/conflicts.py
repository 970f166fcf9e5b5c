"""Rows displaced by a UNIQUE conflict: removed the same way on every node, and recorded.

A table with a secondary UNIQUE constraint has all its changes in one stream (see the
publisher), so every node applies them in one order. When a change carries a UNIQUE value that
another row holds here (two nodes took the same e-mail at once; an ``INSERT OR REPLACE`` that
removed a row without a delete trigger), the change later in that order wins: the rows holding
the value are removed and the change applied. Every node meets the same conflict at the same
point of the stream and removes the same rows, so all end identical. Each removed row is kept in
``__harmonylite__conflicts`` (table, key, its values, the winning change's origin, stream and
sequence), shown by ``harmonylite conflicts list``: nothing disappears without a trace.

A row this node wrote whose own change has not come back from the stream yet is recorded
*provisionally* (``provisional`` holds that change's id): its change follows in the same order
and decides. When it comes back as the row's state, the row is back on every node (it then
displaces the row that took its value, recorded as on every other node) and the provisional record
goes; when it comes back as a delete (the publisher read the row after it was displaced), the row
was displaced for good and the record stays. Provisional records are not listed or counted: a
surviving row is never listed as displaced, and every node lists the same conflicts.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import fetch_all, quote_ident
from harmonylite.node_ids import from_sqlite, to_sqlite
from harmonylite.replication.deadletter import key_text
from harmonylite.replication.event import dumps_values, loads_values
from harmonylite.replication.statements import raw_mask


def ensure_provisional_column(conn: sqlite3.Connection) -> None:
    """Databases that recorded conflicts before provisional records get the column."""
    cols = {c[1] for c in conn.execute(f"PRAGMA table_info({ddl.PREFIX_CONFLICTS})")}
    if cols and "provisional" not in cols:
        conn.execute(f"ALTER TABLE {ddl.PREFIX_CONFLICTS} ADD COLUMN provisional INTEGER")


def _has_provisional(conn: sqlite3.Connection) -> bool:
    return any(c[1] == "provisional"
               for c in conn.execute(f"PRAGMA table_info({ddl.PREFIX_CONFLICTS})"))


def provisional_keys(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    """(table, key) of the rows recorded provisionally."""
    if not _has_provisional(conn):
        return set()
    return {(str(t), str(k)) for t, k in conn.execute(
        f"SELECT tbl, key FROM {ddl.PREFIX_CONFLICTS} WHERE provisional IS NOT NULL")}


def settle(conn: sqlite3.Connection, table: str, key: tuple[object, ...], change_id: int, *,
           deleted: bool) -> tuple[int, bool]:
    """This node's own change ``change_id`` to (``table``, ``key``) came back: the provisional
    records it decides are dropped (the row is back) or kept for good (``deleted``). Returns how
    many were kept, and whether provisional records of the row remain."""
    where = "tbl = ? AND key = ? AND provisional IS NOT NULL AND provisional <= ?"
    args = (table, key_text(key), change_id)
    if deleted:
        kept = conn.execute(f"UPDATE {ddl.PREFIX_CONFLICTS} SET provisional = NULL WHERE {where}",
                            args).rowcount
    else:
        kept = 0
        conn.execute(f"DELETE FROM {ddl.PREFIX_CONFLICTS} WHERE {where}", args)
    left = conn.execute(f"SELECT 1 FROM {ddl.PREFIX_CONFLICTS} WHERE tbl = ? AND key = ? AND "
                        "provisional IS NOT NULL LIMIT 1", args[:2]).fetchone()
    return kept, left is not None


@dataclass
class Displaced:
    removed: int = 0
    recorded: int = 0
    provisional: list[tuple[str, str]] = field(default_factory=list)  # (table, key)


def displace(conn: sqlite3.Connection, local: TableInfo, columns: tuple[str, ...],
             values: tuple[object, ...], key: tuple[object, ...], *, stream: str, seq: int,
             origin: int, spare: Callable[[tuple[object, ...]], bool] | None = None,
             comes_back: Callable[[tuple[object, ...]], int | None] | None = None
             ) -> Displaced:
    """Remove (and record) the rows other than ``key`` that hold a UNIQUE value of ``values``,
    except those whose key ``spare`` accepts; rows for which ``comes_back`` names a change id
    (this node's own change to them, not back from the stream yet) are recorded
    provisionally."""
    t = quote_ident(local.name)
    cols = ", ".join(quote_ident(c) for c in local.columns)
    done = Displaced()
    for index in local.unique_indexes:
        if not index or any(c not in columns for c in index):
            continue
        vals = tuple(values[columns.index(c)] for c in index)
        if any(v is None for v in vals):
            continue  # NULL never conflicts
        mask = raw_mask(vals)
        where = " AND ".join(
            f"{quote_ident(c)} = {'CAST(? AS TEXT)' if mask and mask[i] else '?'}"
            for i, c in enumerate(index))
        for rowid, *row in fetch_all(conn, f"SELECT rowid, {cols} FROM {t} WHERE {where}",
                                     vals):
            row_key = tuple(row[local.columns.index(c)] for c in local.pk)
            if not local.content_keyed and row_key == key:
                continue  # the row the change is for
            if spare is not None and spare(row_key):
                continue
            until = comes_back(row_key) if comes_back is not None else None
            record(conn, local, tuple(row), key, stream=stream, seq=seq, origin=origin,
                   provisional=until)
            if until is None:
                done.recorded += 1
            else:
                done.provisional.append((local.name, key_text(row_key)))
            conn.execute(f"DELETE FROM {t} WHERE rowid = ?", (rowid,))
            done.removed += 1
    return done


def record(conn: sqlite3.Connection, local: TableInfo, row: tuple[object, ...],
           winner_key: tuple[object, ...], *, stream: str, seq: int, origin: int,
           provisional: int | None = None) -> None:
    """Keep a row that a change is about to remove or overwrite (all of its columns)."""
    row_key = tuple(row[local.columns.index(c)] for c in local.pk)
    conn.execute(
        f"INSERT INTO {ddl.PREFIX_CONFLICTS}(tbl, key, columns, displaced, winner_origin, "
        "winner_key, stream, seq, created_at, provisional) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (local.name, key_text(row_key), json.dumps(list(local.columns)), dumps_values(row),
         to_sqlite(origin), key_text(winner_key), stream, seq, time.time(), provisional))


@dataclass(frozen=True)
class Conflict:
    id: int
    table: str
    key: str
    displaced: dict[str, Any]
    winner_origin: int | None
    winner_key: str | None
    stream: str
    seq: int
    created_at: float

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "table": self.table, "key": self.key,
                "displaced": self.displaced, "winning_origin": self.winner_origin,
                "winning_key": self.winner_key, "stream": self.stream, "sequence": self.seq,
                "created_at": self.created_at}


def _plain(v: object) -> object:
    if isinstance(v, bytes):
        return {"hex": v.hex()}
    return v


def rows(conn: sqlite3.Connection) -> list[Conflict]:
    try:
        final = "WHERE provisional IS NULL " if _has_provisional(conn) else ""
        found = conn.execute(
            f"SELECT id, tbl, key, columns, displaced, winner_origin, winner_key, stream, seq, "
            f"created_at FROM {ddl.PREFIX_CONFLICTS} {final}ORDER BY id").fetchall()
    except sqlite3.OperationalError:  # not installed yet
        return []
    out = []
    for i, tbl, key, cols, displaced, origin, wkey, stream, seq, at in found:
        values = loads_values(displaced)
        out.append(Conflict(int(i), str(tbl), str(key),
                            {c: _plain(v) for c, v in zip(json.loads(cols), values, strict=False)},
                            from_sqlite(origin), wkey, str(stream), int(seq), float(at)))
    return out


def count(conn: sqlite3.Connection) -> int:
    try:
        final = " WHERE provisional IS NULL" if _has_provisional(conn) else ""
        return int(conn.execute(
            f"SELECT count(*) FROM {ddl.PREFIX_CONFLICTS}{final}").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
