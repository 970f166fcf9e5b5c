"""Application triggers fire once per logical write: on the node where the application wrote.

A trigger of the application (an audit row, ``updated_at = now``) runs where the application
writes; what it writes is captured and replicated like any other write. If it also ran when a
replica applies the change, every node would add its own audit row and its own timestamp. So,
like PostgreSQL's apply with ``session_replication_role = replica``, harmonylite makes the
application's triggers skip the replicator's writes: each gets the guard condition the capture
triggers use (``WHEN (SELECT applying FROM __harmonylite__guard …) IS NOT 1``, combined with its
own ``WHEN`` if it has one). The guard is set only inside the applier's transaction, so the
application never sees a difference. Triggers the application creates later (a migration) are
wrapped as soon as the node notices the schema change; ``-cleanup`` restores them as written.
"""

from __future__ import annotations

import re
import sqlite3

from harmonylite.cdc import ddl
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


def wrap_all(conn: sqlite3.Connection) -> list[str]:
    """Add the guard to every application trigger lacking it (inside the caller's transaction).
    Returns the names of the triggers changed."""
    changed = []
    for name, sql in _application_triggers(conn):
        new = wrapped(sql)
        if new is not None:
            conn.execute(f"DROP TRIGGER {quote_ident(name)}")
            conn.execute(new)
            changed.append(name)
    return changed


def unwrap_all(conn: sqlite3.Connection) -> int:
    count = 0
    for name, sql in _application_triggers(conn):
        if GUARD_EXPR in sql:
            conn.execute(f"DROP TRIGGER {quote_ident(name)}")
            conn.execute(unwrapped(sql))
            count += 1
    return count
