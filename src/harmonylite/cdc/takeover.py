"""Taking over a database that ran under HarmonyLite (Go).

HarmonyLite captures changes with its own layout: per table `__harmonylite__<table>_change_log`
(`val_<column>` copies of the row, `type` insert/update/delete, `state` 0 pending / 1 published),
one `__harmonylite___change_log_global` table ordering them, and `AFTER INSERT/UPDATE/DELETE`
triggers named `__harmonylite__<table>_change_log_on_<type>`. Left in place, those triggers keep
filling tables nobody prunes (they skip only connections that register `harmonylite_version()`,
which ours do not), and the changes still pending in them would never reach the other nodes.

At node start, before our capture is installed, :func:`take_over` drops that layout in one
transaction and keeps the keys of the pending changes in `__harmonylite__takeover`; after our
capture is installed, :func:`replay_pending` writes each of them again through our triggers (a
no-op `UPDATE` of the row, or, for a row that was deleted, re-inserting its last values and
deleting it inside a savepoint), so they are published like any local write. What cannot be
replayed (a table without a primary key, a constraint refusing the re-insert) is logged with its
table, operation and key: reported, never dropped in silence.

HarmonyLite keeps its stream positions in `seq-map.cbor` (by default `/tmp/seq-map.cbor`, the same
CBOR map of stream name to sequence as ours). When ours does not exist yet, HarmonyLite's is
copied to it, so the node resumes after the messages HarmonyLite already applied instead of
re-reading them (they are in HarmonyLite's wire format).
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2

from harmonylite.db.connection import PREFIX, quote_ident, write_transaction

log = logging.getLogger(__name__)

GLOBAL = f"{PREFIX}_change_log_global"
SUFFIX = "_change_log"
PENDING = f"{PREFIX}takeover"
HARMONYLITE_SEQ_MAP = Path(tempfile.gettempdir()) / "seq-map.cbor"


@dataclass
class Takeover:
    dropped: list[str] = field(default_factory=list)
    pending: int = 0  # pending changes found (one per row: the last change of each row counts)
    unkeyed: int = 0  # pending changes of tables without a primary key: reported only
    seq_map_from: Path | None = None


def _objects(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    """HarmonyLite's change-log tables and its triggers, by name."""
    rows = conn.execute("SELECT type, name, coalesce(sql, '') FROM sqlite_master "
                        "WHERE substr(name, 1, ?) = ?", (len(PREFIX), PREFIX)).fetchall()
    tables = [str(n) for t, n, _ in rows
              if t == "table" and (n == GLOBAL or str(n).endswith(SUFFIX))]
    triggers = [str(n) for t, n, sql in rows
                if t == "trigger" and ("harmonylite_version" in sql
                                       or f"{SUFFIX}_on_" in str(n))]
    return tables, triggers


def _primary_key(conn: sqlite3.Connection, table: str) -> list[str]:
    cols = conn.execute(f"PRAGMA table_info({quote_ident(table)})").fetchall()
    return [str(c[1]) for c in sorted((c for c in cols if c[5]), key=lambda c: c[5])]


def _pending_rows(conn: sqlite3.Connection, log_table: str, table: str
                  ) -> list[tuple[str, dict[str, Any]]]:
    """(type, {column: value}) of each pending change, oldest first."""
    cur = conn.execute(f"SELECT * FROM {quote_ident(log_table)} WHERE state = 0 ORDER BY id")
    names = [d[0] for d in cur.description]
    out = []
    for row in cur.fetchall():
        rec = dict(zip(names, row, strict=True))
        values = {k[4:]: v for k, v in rec.items() if k.startswith("val_")}
        out.append((str(rec.get("type") or "").lower(), values))
    return out


def take_over(conn: sqlite3.Connection, seq_map_path: Path | None = None, *,
              keep_pending: bool = True) -> Takeover:
    """Drop HarmonyLite's layout, keeping (``keep_pending``) or reporting its pending changes."""
    report = Takeover()
    if seq_map_path is not None and not seq_map_path.exists() and HARMONYLITE_SEQ_MAP.is_file() \
            and seq_map_path != HARMONYLITE_SEQ_MAP:
        tables, _ = _objects(conn)
        if tables:  # only a database HarmonyLite ran on inherits its positions
            shutil.copyfile(HARMONYLITE_SEQ_MAP, seq_map_path)
            report.seq_map_from = HARMONYLITE_SEQ_MAP
            log.info("took over HarmonyLite's stream positions from %s into %s",
                     HARMONYLITE_SEQ_MAP, seq_map_path)
    with write_transaction(conn):
        tables, triggers = _objects(conn)
        if not tables and not triggers:
            return report
        if keep_pending:
            conn.execute(f"CREATE TABLE IF NOT EXISTS {PENDING} (id INTEGER PRIMARY KEY, "
                         "tbl TEXT NOT NULL, op TEXT NOT NULL, key BLOB NOT NULL, "
                         "row BLOB NOT NULL)")
        existing = {str(r[0]) for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        for log_table in tables:
            if log_table == GLOBAL:
                continue
            table = log_table[len(PREFIX):-len(SUFFIX)]
            changes = _pending_rows(conn, log_table, table)
            if not changes:
                continue
            pk = _primary_key(conn, table) if table in existing else []
            last: dict[tuple[Any, ...], tuple[str, dict[str, Any]]] = {}
            for op, values in changes:
                if not pk or any(k not in values for k in pk):
                    report.unkeyed += 1
                    log.error("HarmonyLite change not replayable (table %r has no primary key "
                              "here): %s %s", table, op, values, extra={"table": table})
                    continue
                last[tuple(values[k] for k in pk)] = (op, values)
            report.pending += len(last)
            for key, (op, values) in last.items():
                if keep_pending:
                    conn.execute(f"INSERT INTO {PENDING}(tbl, op, key, row) VALUES (?, ?, ?, ?)",
                                 (table, op, cbor2.dumps(list(key)), cbor2.dumps(values)))
                else:
                    log.warning("discarding HarmonyLite's pending change: %s %r key %s", op,
                                table, list(key), extra={"table": table})
        for name in triggers:
            conn.execute(f"DROP TRIGGER IF EXISTS {quote_ident(name)}")
        for name in tables:
            conn.execute(f"DROP TABLE IF EXISTS {quote_ident(name)}")
        report.dropped = sorted(triggers + tables)
    log.warning("took over a HarmonyLite database: dropped its %d triggers and %d change-log "
                "tables; %d pending changes %s", len(triggers), len(tables), report.pending,
                "kept to be published" if keep_pending else "discarded",
                extra={"pending": report.pending})
    return report


def replay_pending(conn: sqlite3.Connection) -> int:
    """Write the kept HarmonyLite changes again through our triggers; returns how many."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                    (PENDING,)).fetchone() is None:
        return 0
    done = 0
    with write_transaction(conn):
        for ident, table, op, key_blob, row_blob in conn.execute(
                f"SELECT id, tbl, op, key, row FROM {PENDING} ORDER BY id").fetchall():
            key, values = cbor2.loads(key_blob), cbor2.loads(row_blob)
            if _replay_one(conn, str(table), str(op), list(key), dict(values)):
                done += 1
            conn.execute(f"DELETE FROM {PENDING} WHERE id = ?", (ident,))
        conn.execute(f"DROP TABLE {PENDING}")
    if done:
        log.info("queued %d changes HarmonyLite had not published yet", done)
    return done


def _replay_one(conn: sqlite3.Connection, table: str, op: str, key: list[Any],
                values: dict[str, Any]) -> bool:
    pk = _primary_key(conn, table)
    if len(pk) != len(key):
        log.error("HarmonyLite change not replayable (table %r changed its key): %s key %s",
                  table, op, key, extra={"table": table})
        return False
    qt = quote_ident(table)
    where = " AND ".join(f"{quote_ident(c)} IS ?" for c in pk)
    if conn.execute(f"SELECT 1 FROM {qt} WHERE {where}", key).fetchone() is not None:
        # The row as it is now is what the other nodes must end with (apply is state-based).
        sets = ", ".join(f"{quote_ident(c)} = {quote_ident(c)}" for c in pk)
        conn.execute(f"UPDATE {qt} SET {sets} WHERE {where}", key)
        return True
    # Deleted: the other nodes must delete it too. Our triggers capture a delete only of a row
    # that exists, so put its last values back and delete it, all inside a savepoint.
    columns = {str(c[1]) for c in conn.execute(f"PRAGMA table_info({qt})")}
    cols = [c for c in values if c in columns]
    conn.execute("SAVEPOINT harmonylite_takeover")
    try:
        conn.execute(f"INSERT INTO {qt}({', '.join(map(quote_ident, cols))}) "
                     f"VALUES ({', '.join('?' for _ in cols)})", [values[c] for c in cols])
        conn.execute(f"DELETE FROM {qt} WHERE {where}", key)
    except sqlite3.DatabaseError as exc:
        conn.execute("ROLLBACK TO harmonylite_takeover")
        conn.execute("RELEASE harmonylite_takeover")
        log.error("HarmonyLite's pending delete of %r key %s cannot be replayed (%s): delete "
                  "the row on the other nodes by hand", table, key, exc, extra={"table": table})
        return False
    conn.execute("RELEASE harmonylite_takeover")
    return True
