"""Introspection of the user's tables: columns, primary key, and a hash of the schema."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

from harmonylite.cdc.catalogue import catalogue
from harmonylite.db.connection import PREFIX, quote_ident

ROWID = "rowid"


@dataclass(frozen=True)
class TableInfo:
    name: str
    columns: tuple[str, ...]
    # The row's identity across nodes: the primary key; for a table without one, every column
    # (a rowid is no identity: VACUUM renumbers it, and two nodes hand out the same ones).
    pk: tuple[str, ...]
    rowid_keyed: bool  # no declared primary key: rows are identified by their content
    nullable_key: bool = False  # a key column may hold NULL (SQLite allows it in rowid tables)
    unique_indexes: tuple[tuple[str, ...], ...] = ()  # secondary UNIQUE constraints (columns)
    key_collations: tuple[str, ...] = ()  # per key column: BINARY, NOCASE, RTRIM…
    unique_collations: tuple[tuple[str, ...], ...] = ()  # per unique index, per column

    @property
    def content_keyed(self) -> bool:
        return self.rowid_keyed

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(c) for c in self.pk)


def is_internal(name: str) -> bool:
    return name.startswith(PREFIX) or name.startswith("sqlite_")


def user_tables(conn: sqlite3.Connection) -> tuple[list[TableInfo], list[str]]:
    """Tables that can be replicated, and the names of those that cannot (virtual tables).
    Shadow tables and SQLite's own are in neither (see :mod:`harmonylite.cdc.catalogue`)."""
    kinds = catalogue(conn)
    return [table_info(conn, name) for name in kinds.ordinary], list(kinds.virtual)


def table_info(conn: sqlite3.Connection, name: str) -> TableInfo:
    q = quote_ident(name)
    cols = conn.execute(f"PRAGMA table_xinfo({q})").fetchall()
    # table_xinfo: cid, name, type, notnull, dflt, pk, hidden (2/3 = generated columns)
    columns = tuple(c[1] for c in cols if c[6] == 0)
    keyed = sorted((c for c in cols if c[5] > 0), key=lambda c: c[5])
    uniques = unique_indexes(conn, name)
    ucolls = unique_collations(conn, name)
    if not keyed:
        return TableInfo(name, columns, columns, True, False, uniques,
                         ("BINARY",) * len(columns), ucolls)
    pk = tuple(c[1] for c in keyed)
    integer_pk = len(keyed) == 1 and str(keyed[0][2]).upper() == "INTEGER"
    # In a rowid table, a key column not declared NOT NULL may hold NULL (a bug SQLite keeps for
    # compatibility); WITHOUT ROWID tables and INTEGER PRIMARY KEY never do.
    nullable = not integer_pk and any(c[3] == 0 for c in keyed) and _has_rowid(conn, q)
    colls = _key_collations(conn, name, pk)
    return TableInfo(name, columns, pk, False, nullable, uniques, colls, ucolls)


def _key_collations(conn: sqlite3.Connection, name: str,
                    pk: tuple[str, ...]) -> tuple[str, ...]:
    """The collation of each key column, from the primary key's index (BINARY without one)."""
    for _seq, index, _unique, origin, _partial in conn.execute(
            f"PRAGMA index_list({quote_ident(name)})").fetchall():
        if origin == "pk":
            colls = {r[2]: str(r[4]).upper() for r in conn.execute(
                f"PRAGMA index_xinfo({quote_ident(index)})") if r[5]}
            return tuple(colls.get(c, "BINARY") for c in pk)
    return ("BINARY",) * len(pk)


def _fold(value: object, collation: str) -> object:
    if collation == "NOCASE":  # SQLite folds ASCII letters only
        if isinstance(value, str):
            return value.translate(_ASCII_LOWER)
        if isinstance(value, bytes):
            return bytes(b + 32 if 65 <= b <= 90 else b for b in value)
    elif collation == "RTRIM":
        if isinstance(value, str):
            return value.rstrip(" ")
        if isinstance(value, bytes):
            return value.rstrip(b" ")
    return value


_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def fold_key(key: tuple[object, ...] | list[object],
             collations: tuple[str, ...]) -> tuple[object, ...]:
    """A key as its collations compare it: two keys that are the same row under the table's
    collations (``'Key'`` and ``'KEY'`` with NOCASE) fold to the same value. Used wherever a
    row's identity is computed outside SQLite (the shard, the applier's pending check)."""
    if not collations or all(c == "BINARY" for c in collations):
        return tuple(key)
    return tuple(_fold(v, c) for v, c in zip(key, collations, strict=False))


def _has_rowid(conn: sqlite3.Connection, quoted: str) -> bool:
    try:
        conn.execute(f"SELECT rowid FROM {quoted} LIMIT 0")
    except sqlite3.OperationalError:
        return False
    return True


def unique_indexes(conn: sqlite3.Connection, name: str) -> tuple[tuple[str, ...], ...]:
    """Column lists of the table's UNIQUE indexes other than its primary key (indexes on
    expressions are listed with an empty column list: their values are not plain columns)."""
    out = []
    for _seq, index, unique, origin, _partial in conn.execute(
            f"PRAGMA index_list({quote_ident(name)})").fetchall():
        if not unique or origin == "pk":
            continue
        cols = [c[2] for c in conn.execute(f"PRAGMA index_info({quote_ident(index)})")]
        out.append(() if any(c is None for c in cols) else tuple(cols))
    return tuple(out)


def unique_collations(conn: sqlite3.Connection, name: str) -> tuple[tuple[str, ...], ...]:
    """Per index of :func:`unique_indexes` (same order), the collation of each column."""
    out = []
    for _seq, index, unique, origin, _partial in conn.execute(
            f"PRAGMA index_list({quote_ident(name)})").fetchall():
        if not unique or origin == "pk":
            continue
        # index_xinfo: seqno, cid, name, desc, coll, key (0 for the row's key appended)
        out.append(tuple(str(r[4]).upper() for r in conn.execute(
            f"PRAGMA index_xinfo({quote_ident(index)})") if r[5]))
    return tuple(out)


def schema_hash(conn: sqlite3.Connection) -> str:
    """SHA-256 over the user schema (tables, indexes, views, user triggers), order-independent."""
    rows = conn.execute(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master "
        "WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY type, name"
    ).fetchall()
    digest = hashlib.sha256()
    for typ, name, sql in rows:
        if is_internal(name):
            continue
        digest.update(f"{typ}\0{name}\0{sql}\0".encode())
    return digest.hexdigest()
