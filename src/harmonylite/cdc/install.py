"""Install, refresh and remove change capture in a user database (idempotent)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonylite.cdc import app_triggers, ddl
from harmonylite.cdc.app_triggers import TriggerReport
from harmonylite.cdc.catalogue import catalogue
from harmonylite.cdc.schema import TableInfo, table_info
from harmonylite.db.connection import PREFIX, quote_ident, write_transaction

log = logging.getLogger(__name__)


@dataclass
class InstallReport:
    tables: list[TableInfo] = field(default_factory=list)
    rowid_keyed: list[str] = field(default_factory=list)
    skipped_virtual: list[str] = field(default_factory=list)
    shadow: dict[str, str] = field(default_factory=dict)  # shadow table -> its virtual table
    internal: list[str] = field(default_factory=list)  # SQLite's own (sqlite_sequence…)
    # Tables whose current rows were captured as changes: new since capture started, or rebuilt
    # (their triggers had gone with the old table), so rows written meanwhile are not lost.
    backfilled: dict[str, int] = field(default_factory=dict)
    excluded: list[str] = field(default_factory=list)  # not replicated (configuration)
    # What became of the application's triggers (see app_triggers).
    triggers: TriggerReport = field(default_factory=TriggerReport)

    @property
    def wrapped_triggers(self) -> list[str]:
        """Application triggers given the guard, so they skip the replicator's writes."""
        return self.triggers.wrapped


def _log_columns(conn: sqlite3.Connection, prefix: str) -> int:
    cols = conn.execute(f"PRAGMA table_info({ddl.LOG})").fetchall()
    return sum(1 for c in cols if c[1].startswith(prefix) and c[1][1:].isdigit())


def _upgrade_layout(conn: sqlite3.Connection) -> None:
    """Move the keys of changes captured with the earlier layout (whole rows in c0…) to k0…."""
    if conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'layout'").fetchone():
        return
    if _log_columns(conn, "c"):
        for tid, cols, pk in conn.execute(f"SELECT tid, columns, pk FROM {ddl.TABLES}"):
            columns, keys = json.loads(cols), json.loads(pk)
            sets = ", ".join(f"{ddl.key_column(i)} = c{columns.index(k)}"
                             for i, k in enumerate(keys) if k in columns)
            if sets:
                conn.execute(f"UPDATE {ddl.LOG} SET {sets} WHERE tid = ?", (tid,))
    conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES ('layout', 2)")


TableFilter = Callable[[str], bool]


def install(conn: sqlite3.Connection, replicated: TableFilter | None = None) -> InstallReport:
    """Create the change-log objects and (re)create the triggers of every user table.

    Runs in one IMMEDIATE transaction so an application writing meanwhile sees either no triggers
    or all of them.
    """
    with write_transaction(conn):
        report = install_in_transaction(conn, replicated)
    report_install(report)
    return report


def install_in_transaction(conn: sqlite3.Connection,
                           replicated: TableFilter | None = None, *,
                           backfill: bool = True) -> InstallReport:
    """:func:`install` inside a write transaction the caller holds (the applier does, when the
    schema changed under it). ``replicated`` says which tables are (``exclude_tables`` and
    ``include_tables``); the others get no capture (their triggers are dropped). Without
    ``backfill``, new and rebuilt tables are not republished: the schema change came from
    another node, which publishes their rows itself."""
    report = InstallReport()
    for stmt in ddl.BASE_DDL:
        conn.execute(stmt)
    kinds = catalogue(conn)
    tables = [table_info(conn, name) for name in kinds.ordinary]
    report.skipped_virtual, report.shadow = list(kinds.virtual), dict(kinds.shadow)
    report.internal = list(kinds.internal)
    if replicated is not None:
        report.excluded = [t.name for t in tables if not replicated(t.name)]
        tables = [t for t in tables if replicated(t.name)]
    width = max((len(t.pk) for t in tables), default=0)
    for stmt in ddl.add_key_columns_ddl(_log_columns(conn, "k"), width):
        conn.execute(stmt)
    _upgrade_layout(conn)
    # Capture that starts on a table while the node runs (or after it was stopped) finds rows
    # written without it; the very first install does not: those rows are the node's starting
    # point (provisioned from a snapshot, or the same data everywhere).
    started = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'capture_started'").fetchone()
    known = {str(n): (str(c), str(p)) for n, c, p in conn.execute(
        f"SELECT name, columns, pk FROM {ddl.TABLES}")}
    have = {str(n): str(q) for n, q in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND substr(name, 1, ?) = ?",
        (len(PREFIX) + 1, PREFIX + "t"))}
    wanted: set[str] = set()
    for table in tables:
        shape = (json.dumps(table.columns), json.dumps(table.pk))
        if known.get(table.name) != shape:
            conn.execute(ddl.table_registry_upsert(table, *shape))
        tid = conn.execute(
            f"SELECT tid FROM {ddl.TABLES} WHERE name = ?", (table.name,)
        ).fetchone()[0]
        triggers = ddl.trigger_ddl(tid, table)
        rebuilt = table.name in known and any(name not in have for name, _ in triggers)
        triggers += ddl.replace_trigger_ddl(tid, table)
        # Only what differs is created again: an install that changes nothing writes nothing
        # and leaves schema_version alone (schema watchers would otherwise chase their tails).
        for name, create in triggers:
            if have.get(name) != create:
                conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(name)}")
                conn.execute(create)
            wanted.add(name)
        # (A rebuilt table without a primary key is not republished: its rows, identified by
        # content, would be added again on every node.)
        fresh = table.name not in known or (rebuilt and not table.content_keyed)
        if backfill and started and fresh:
            count = conn.execute(ddl.backfill_sql(tid, table)).rowcount
            if count:
                report.backfilled[table.name] = count
        if table.rowid_keyed:
            report.rowid_keyed.append(table.name)
    # Triggers of a table renamed or dropped since: SQLite moved them along with a renamed
    # table, where they would capture its changes under the old name too.
    for name in sorted(set(have) - wanted):
        conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(name)}")
    report.triggers = app_triggers.reconcile(conn, kinds, {t.name for t in tables})
    if not started:
        conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES ('capture_started', 1)")
    report.tables = tables
    return report


def report_install(report: InstallReport, *, at_start: bool = True) -> None:
    for name in report.rowid_keyed if at_start else ():
        log.warning(
            "table %r has no primary key: its rows are identified by their whole content (an "
            "update replicates as the old row removed and the new one added), and while it is "
            "captured a column of it cannot be dropped; declare a primary key if you can",
            name, extra={"table": name},
        )
    if report.excluded and at_start:
        log.info("not replicated (exclude_tables / include_tables): %s",
                 ", ".join(report.excluded), extra={"tables": len(report.excluded)})
    if at_start:
        report_left_out(report)
    report_triggers(report.triggers)
    for name, count in sorted(report.backfilled.items()):
        log.info("capture started on table %r: its %d current rows are published", name, count,
                 extra={"table": name, "rows": count})


def report_left_out(report: InstallReport) -> None:
    """Every table change capture leaves out, with why (the excluded ones are logged above)."""
    kept_by: dict[str, list[str]] = {}
    for trigger, tables in sorted(report.triggers.firing.items()):
        for table in tables:
            kept_by.setdefault(table, []).append(trigger)
    for name in report.skipped_virtual:
        if name in kept_by:
            log.info("virtual table %r is not replicated (it cannot carry triggers): every node "
                     "keeps it from the replicated rows through the application's triggers %s",
                     name, ", ".join(kept_by[name]), extra={"table": name})
        else:
            log.warning("virtual table %r cannot carry triggers and is not replicated: what is "
                        "written into it stays on this node", name, extra={"table": name})
    if report.shadow:
        shadows = sorted(report.shadow.items())
        log.info("not replicated (shadow tables, written by their virtual table): %s",
                 ", ".join(f"{s} (shadow table of {o!r})" for s, o in shadows),
                 extra={"tables": len(shadows)})
    if report.internal:
        log.info("not replicated (SQLite's internal tables): %s", ", ".join(report.internal),
                 extra={"tables": len(report.internal)})


def report_triggers(report: TriggerReport) -> None:
    for name in report.wrapped:
        log.info("application trigger %r fires only for this node's own writes, not when "
                 "changes from other nodes are applied", name, extra={"trigger": name})
    for name, tables in sorted(report.firing.items()):
        log.info("application trigger %r writes only tables that are not replicated (%s): it "
                 "fires for changes from other nodes too, so every node keeps them itself",
                 name, ", ".join(tables), extra={"trigger": name})
    for name in report.released:
        stale = [t for t in report.firing[name] if t not in report.rebuilt]
        if stale:
            log.warning("application trigger %r fired only for this node's own writes until "
                        "now: what it keeps in %s may miss rows written on other nodes; "
                        "recompute it", name, ", ".join(stale), extra={"trigger": name})
    for name in report.rebuilt:
        log.info("full-text index %r rebuilt from its content, now that its triggers fire for "
                 "changes from other nodes too", name, extra={"table": name})
    for name, error in sorted(report.rebuild_failed.items()):
        log.warning("full-text index %r could not be rebuilt (%s): rebuild it with "
                    "INSERT INTO %s(%s) VALUES ('rebuild')", name, error, name, name,
                    extra={"table": name})
    for name, (replicated, kept) in sorted(report.mixed.items()):
        log.warning("application trigger %r writes replicated tables (%s) and tables each node "
                    "keeps itself (%s): it fires only for this node's own writes, so %s miss "
                    "the rows written on other nodes; split it into two triggers", name,
                    ", ".join(replicated), ", ".join(kept), ", ".join(kept),
                    extra={"trigger": name})
    for name, error in sorted(report.unknown.items()):
        log.warning("cannot tell which tables application trigger %r writes (SQLite: %s): it "
                    "is left as it is", name, error, extra={"trigger": name})


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
        # First the application's triggers as it wrote them: they must not name our guard.
        app_triggers.unwrap_all(conn)
        objects = harmonylite_objects(conn)
        for typ, name in sorted(objects, key=lambda o: o[0] != "trigger"):
            if typ in ("trigger", "table", "view"):
                conn.execute(f"DROP {typ.upper()} IF EXISTS {quote_ident(name)}")
    return sum(1 for t, _ in objects if t in ("trigger", "table", "view"))
