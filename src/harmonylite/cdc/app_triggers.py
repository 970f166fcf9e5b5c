"""Application triggers and replicated rows: which fire when a change from another node is applied.

A trigger of the application either derives data that is itself replicated, or data each node
keeps for itself; which one is decided per trigger from the tables it writes (asked of SQLite,
see :mod:`harmonylite.cdc.trigger_targets`):

- **It writes a replicated table** (an audit row, ``updated_at = now``): it runs where the
  application writes, and what it writes is captured and replicated like any other write. If it
  also ran when a replica applies the change, every node would add its own audit row and its own
  timestamp. So, like PostgreSQL's apply with ``session_replication_role = replica``, it skips
  the replicator's writes: it gets the guard condition the capture triggers use (``WHEN (SELECT
  applying FROM __harmonylite__guard …) IS NOT 1``, combined with its own ``WHEN`` if it has
  one). The guard is set only inside the applier's transaction, so the application never sees a
  difference. A trigger that writes nothing (a check raising an error) is guarded too: a row its
  origin accepted is not refused elsewhere.
- **It writes only tables that are not replicated**: a virtual table (an FTS5 external-content
  index, an R*Tree), which cannot carry capture triggers, or a table excluded from replication
  (a per-node counter or summary). Nothing else would keep those right for rows written on other
  nodes, so the trigger fires for replicated rows too: it is left as the application wrote it.
- **It writes both**: neither choice is right (the replicated half would run twice, or the
  per-node half miss the other nodes' rows). It keeps the guard and is reported, asking for two
  triggers.

Triggers the application creates later (a migration) are decided as soon as the node notices
the schema change; ``-cleanup`` and snapshots give back every trigger as written.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

from harmonylite.cdc import ddl, trigger_targets
from harmonylite.cdc.catalogue import FTS_MODULES, Catalogue
from harmonylite.db.connection import PREFIX, quote_ident

GUARD_EXPR = f"(SELECT applying FROM {ddl.GUARD} WHERE id = 1) IS NOT 1"
_WRAPPED_WHEN = f"WHEN {GUARD_EXPR} AND ("
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def _top_level_words(sql: str) -> list[tuple[int, str]]:
    """(position, upper-cased word) of every keyword-like token outside quotes and comments."""
    out: list[tuple[int, str]] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`[":
            close = "]" if ch == "[" else ch
            j = i + 1
            while j < n:
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == close:
                        j += 2  # doubled quote inside
                        continue
                    break
                j += 1
            i = j + 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            m = _WORD.match(sql, i)
            if m:
                out.append((i, m.group(0).upper()))
                i = m.end()
            else:
                i += 1
    return out


def wrapped(sql: str) -> str | None:
    """The trigger's SQL with the guard added (None when it is already there or unparsable)."""
    if GUARD_EXPR in sql:
        return None
    words = _top_level_words(sql)
    begin = next((p for p, w in words if w == "BEGIN"), None)
    if begin is None:
        return None
    when = next((p for p, w in words if w == "WHEN" and p < begin), None)
    if when is None:
        return f"{sql[:begin].rstrip()} WHEN {GUARD_EXPR} {sql[begin:]}"
    condition = sql[when + 4:begin].strip()
    return f"{sql[:when]}{_WRAPPED_WHEN}{condition}) {sql[begin:]}"


def unwrapped(sql: str) -> str:
    """The trigger's SQL as the application wrote it (undoing :func:`wrapped`)."""
    if _WRAPPED_WHEN in sql:
        head, _, rest = sql.partition(_WRAPPED_WHEN)
        words = _top_level_words(rest)
        begin = next(p for p, w in words if w == "BEGIN")
        condition = rest[:begin].rstrip()
        if condition.endswith(")"):
            condition = condition[:-1]
        return f"{head}WHEN {condition} {rest[begin:]}"
    return sql.replace(f" WHEN {GUARD_EXPR} ", " ", 1)


def _application_triggers(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(str(n), str(q)) for n, q in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND sql IS NOT NULL "
        "AND substr(name, 1, ?) != ?", (len(PREFIX), PREFIX))]


@dataclass
class TriggerReport:
    wrapped: list[str] = field(default_factory=list)  # given the guard by this install
    # trigger -> the tables, kept by each node itself, it writes: fires for replicated rows too
    firing: dict[str, list[str]] = field(default_factory=dict)
    # guard removed by this install (an earlier version, or the table was replicated): what it
    # derived on this node so far misses the rows other nodes wrote meanwhile
    released: list[str] = field(default_factory=list)
    # trigger -> (replicated tables, per-node tables) it writes: guarded, reported
    mixed: dict[str, tuple[list[str], list[str]]] = field(default_factory=dict)
    unknown: dict[str, str] = field(default_factory=dict)  # trigger -> why; left as it was
    rebuilt: list[str] = field(default_factory=list)  # full-text indexes rebuilt after a release
    rebuild_failed: dict[str, str] = field(default_factory=dict)  # index -> SQLite's error


def _replace(conn: sqlite3.Connection, name: str, sql: str) -> None:
    conn.execute(f"DROP TRIGGER {quote_ident(name)}")
    conn.execute(sql)


def reconcile(conn: sqlite3.Connection, kinds: Catalogue, captured: set[str]) -> TriggerReport:
    """Guard or release every application trigger as :mod:`this module <app_triggers>` says
    (inside the caller's transaction). ``captured``: the tables replicated from this node."""
    report = TriggerReport()
    local = set(kinds.virtual) | set(kinds.shadow) | (set(kinds.ordinary) - captured)
    triggers = [(str(n), str(t), str(q)) for n, t, q in conn.execute(
        "SELECT name, tbl_name, sql FROM sqlite_master WHERE type = 'trigger' "
        "AND sql IS NOT NULL AND substr(name, 1, ?) != ? ORDER BY name",
        (len(PREFIX), PREFIX))]
    on_tables = sorted({t for _, t, _ in triggers if t in kinds.ordinary})
    targets = trigger_targets.analyse(conn, on_tables)
    for name, table, sql in triggers:
        if table in targets.failed:
            report.unknown[name] = targets.failed[table]
            continue
        written = targets.writes.get(name, set()) if table in kinds.ordinary else set()
        kept, replicated = sorted(written & local), sorted(written - local)
        if kept and not replicated:
            report.firing[name] = kept
            if GUARD_EXPR in sql:
                _replace(conn, name, unwrapped(sql))
                report.released.append(name)
                _rebuild(conn, kinds, kept, report)
            continue
        if kept:
            report.mixed[name] = (replicated, kept)
        new = wrapped(sql)
        if new is not None:
            _replace(conn, name, new)
            report.wrapped.append(name)
    return report


def _rebuild(conn: sqlite3.Connection, kinds: Catalogue, tables: list[str],
             report: TriggerReport) -> None:
    """A full-text index whose trigger skipped the rows other nodes wrote is rebuilt from its
    content (FTS3/4/5's ``'rebuild'`` command); other derived data is reported only."""
    for table in tables:
        if kinds.virtual.get(table) not in FTS_MODULES or table in report.rebuilt:
            continue
        q = quote_ident(table)
        try:
            conn.execute(f"INSERT INTO {q}({q}) VALUES ('rebuild')")
        except sqlite3.Error as exc:  # a contentless index has nothing to rebuild from
            report.rebuild_failed[table] = str(exc)
        else:
            report.rebuilt.append(table)


def unwrap_all(conn: sqlite3.Connection) -> int:
    count = 0
    for name, sql in _application_triggers(conn):
        if GUARD_EXPR in sql:
            conn.execute(f"DROP TRIGGER {quote_ident(name)}")
            conn.execute(unwrapped(sql))
            count += 1
    return count
