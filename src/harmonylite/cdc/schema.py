"""Introspection of the user's tables: columns, primary key, and a hash of the schema."""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass

from harmonylite.db.connection import PREFIX, quote_ident

ROWID = "rowid"


@dataclass(frozen=True)
class TableInfo:
    name: str
    # Columns captured by the triggers, in change-log order. Tables without a primary key lead
    # with the implicit rowid, which then serves as the key.
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    rowid_keyed: bool

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(c) for c in self.pk)


def is_internal(name: str) -> bool:
    return name.startswith(PREFIX) or name.startswith("sqlite_")


def user_tables(conn: sqlite3.Connection) -> tuple[list[TableInfo], list[str]]:
    """Tables that can be replicated, and the names of those that cannot (virtual tables)."""
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ).fetchall()
    tables: list[TableInfo] = []
    skipped: list[str] = []
    for name, sql in rows:
        if is_internal(name):
            continue
        if sql and sql.lstrip().upper().startswith("CREATE VIRTUAL"):
            skipped.append(name)
            continue
        tables.append(table_info(conn, name))
    # Shadow tables of virtual tables (FTS5 and friends) are maintained by the virtual table.
    shadow_prefixes = tuple(f"{v}_" for v in skipped)
    if shadow_prefixes:
        tables = [t for t in tables if not t.name.startswith(shadow_prefixes)]
    return tables, skipped


def table_info(conn: sqlite3.Connection, name: str) -> TableInfo:
    cols = conn.execute(f"PRAGMA table_xinfo({quote_ident(name)})").fetchall()
    # table_xinfo: cid, name, type, notnull, dflt, pk, hidden (2/3 = generated columns)
    columns = [c[1] for c in cols if c[6] == 0]
    pk = [c[1] for c in sorted((c for c in cols if c[5] > 0), key=lambda c: c[5])]
    if not pk:
        return TableInfo(name, (ROWID, *columns), (ROWID,), True)
    return TableInfo(name, tuple(columns), tuple(pk), False)


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
