"""Install, refresh and remove change capture in a user database (idempotent)."""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo, user_tables
from harmonylite.db.connection import PREFIX, quote_ident, write_transaction

log = logging.getLogger(__name__)


@dataclass
class InstallReport:
    tables: list[TableInfo] = field(default_factory=list)
    rowid_keyed: list[str] = field(default_factory=list)
    skipped_virtual: list[str] = field(default_factory=list)


def _log_width(conn: sqlite3.Connection) -> int:
    cols = conn.execute(f"PRAGMA table_info({ddl.LOG})").fetchall()
    return sum(1 for c in cols if c[1].startswith("c") and c[1][1:].isdigit())


def install(conn: sqlite3.Connection) -> InstallReport:
    """Create the change-log objects and (re)create the triggers of every user table.

    Runs in one IMMEDIATE transaction so an application writing meanwhile sees either no triggers
    or all of them.
    """
    report = InstallReport()
    with write_transaction(conn):
        for stmt in ddl.BASE_DDL:
            conn.execute(stmt)
        tables, report.skipped_virtual = user_tables(conn)
        width = max((len(t.columns) for t in tables), default=0)
        for stmt in ddl.add_columns_ddl(_log_width(conn), width):
            conn.execute(stmt)
        for table in tables:
            conn.execute(
                ddl.table_registry_upsert(table, json.dumps(table.columns), json.dumps(table.pk))
            )
            tid = conn.execute(
                f"SELECT tid FROM {ddl.TABLES} WHERE name = ?", (table.name,)
            ).fetchone()[0]
            for stmt in ddl.trigger_ddl(tid, table):
                conn.execute(stmt)
            if table.rowid_keyed:
                report.rowid_keyed.append(table.name)
        report.tables = tables
    for name in report.rowid_keyed:
        log.warning(
            "table %r has no primary key: rows are keyed by rowid, and inserts made concurrently "
            "on two nodes can collide on the same rowid",
            name,
        )
    for name in report.skipped_virtual:
        log.warning("virtual table %r cannot carry triggers and is not replicated", name)
    return report


def harmonylite_objects(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """(type, name) of every harmonylite object in the schema."""
    rows = conn.execute(
        "SELECT type, name FROM sqlite_master WHERE substr(name, 1, ?) = ?",
        (len(PREFIX), PREFIX),
    ).fetchall()
    return [(str(t), str(n)) for t, n in rows]


def remove_all(conn: sqlite3.Connection) -> int:
    """Drop every harmonylite trigger and table; returns how many objects were dropped."""
    with write_transaction(conn):
        objects = harmonylite_objects(conn)
        for typ, name in sorted(objects, key=lambda o: o[0] != "trigger"):
            if typ in ("trigger", "table", "view"):
                conn.execute(f"DROP {typ.upper()} IF EXISTS {quote_ident(name)}")
    return sum(1 for t, _ in objects if t in ("trigger", "table", "view"))
