"""Applying change batches to the local database (runs on the writer's thread).

One transaction per group of messages: the changes, then the stream position in
``__harmonylite__seq``; so a crash re-applies at most an uncommitted suffix, which is harmless
because changes carry whole rows (DESIGN rule 2). Each message gets a savepoint, so one that cannot
be applied is rolled back alone, reported with its stream and sequence, and the rest go on.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass, field

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.schema import ROWID, TableInfo, table_info
from harmonylite.db.connection import quote_ident
from harmonylite.errors import DecodeError
from harmonylite.replication.event import Batch, RowChange, decode

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    last_seq: int = 0
    messages: int = 0
    rows: int = 0
    skipped_pending: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (sequence, reason)
    origin_nodes: set[int] = field(default_factory=set)
    published_at: float | None = None  # JetStream time of the last message, for the lag metric


class UnknownTable(Exception):
    pass


class Applier:
    """Holds prepared SQL per table shape; one instance per writer connection."""

    def __init__(self) -> None:
        self._tables: dict[str, TableInfo | None] = {}
        self._schema_version = -1
        self._sql: dict[tuple[str, tuple[str, ...], int], tuple[str, ...]] = {}
        self._shapes: dict[int, changelog.TableShape] = {}
        self._pending = changelog.PendingKeys()

    def _refresh(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version != self._schema_version:
            self._schema_version = version
            self._tables.clear()
            self._sql.clear()
            self._shapes = changelog.registry(conn)

    def _local(self, conn: sqlite3.Connection, table: str) -> TableInfo | None:
        if table not in self._tables:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            self._tables[table] = table_info(conn, table) if exists else None
        return self._tables[table]

    def _statements(
        self, conn: sqlite3.Connection, table: str, columns: tuple[str, ...], op: int
    ) -> tuple[str, ...]:
        key = (table, columns, op)
        cached = self._sql.get(key)
        if cached is not None:
            return cached
        local = self._local(conn, table)
        if local is None:
            raise UnknownTable(f"no table {table!r} in the local database")
        t = quote_ident(table)
        if op == ddl.OP_DELETE:
            where = " AND ".join(f"{quote_ident(c)} = ?" for c in local.pk)
            sql: tuple[str, ...] = (f"DELETE FROM {t} WHERE {where}",)
        elif local.rowid_keyed:
            cols = [c for c in columns if c != ROWID]
            sets = ", ".join(f"{quote_ident(c)} = ?" for c in cols)
            names = ", ".join(quote_ident(c) for c in cols)
            marks = ", ".join("?" for _ in cols)
            sql = (
                f"UPDATE {t} SET {sets} WHERE rowid = ?" if cols else "",
                f"INSERT OR IGNORE INTO {t}(rowid{', ' if cols else ''}{names}) "
                f"VALUES (?{', ' if cols else ''}{marks})",
            )
        else:
            names = ", ".join(quote_ident(c) for c in columns)
            marks = ", ".join("?" for _ in columns)
            rest = [c for c in columns if c not in local.pk]
            conflict = ", ".join(quote_ident(c) for c in local.pk)
            action = (
                "DO UPDATE SET " + ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}"
                                             for c in rest)
                if rest else "DO NOTHING"
            )
            sql = (f"INSERT INTO {t}({names}) VALUES ({marks}) ON CONFLICT({conflict}) {action}",)
        self._sql[key] = sql
        return sql

    def _apply_change(
        self,
        conn: sqlite3.Connection,
        batch: Batch,
        ch: RowChange,
        pending: changelog.PendingKeys,
    ) -> bool:
        remote_cols = batch.columns[ch.table]
        local = self._local(conn, ch.table)
        if local is None:
            raise UnknownTable(f"no table {ch.table!r} in the local database")
        key = tuple(ch.values[remote_cols.index(c)] for c in batch.keys[ch.table])
        if pending and (ch.table, key) in pending:
            # A local change to this row is not yet published; it will be published after this
            # message, so it is the row's final state everywhere. Applying this one now would only
            # make the row step back until then.
            return False
        local_set = set(local.columns)
        if all(c in local_set for c in remote_cols):
            cols, vals = remote_cols, ch.values
        else:  # columns this node does not have (yet) are left out rather than failing the row
            pairs = [(c, v) for c, v in zip(remote_cols, ch.values, strict=True) if c in local_set]
            cols, vals = tuple(c for c, _ in pairs), tuple(v for _, v in pairs)
        stmts = self._statements(conn, ch.table, cols, ch.op)
        if ch.op == ddl.OP_DELETE:
            conn.execute(stmts[0], key)
        elif local.rowid_keyed:
            rowid = vals[cols.index(ROWID)]
            others = [v for c, v in zip(cols, vals, strict=True) if c != ROWID]
            if stmts[0]:
                cur = conn.execute(stmts[0], (*others, rowid))
                if cur.rowcount:
                    return True
            conn.execute(stmts[1], (rowid, *others))
        else:
            conn.execute(stmts[0], vals)
        return True

    def apply(
        self, conn: sqlite3.Connection, stream: str, messages: list[tuple[int, bytes]]
    ) -> ApplyResult:
        """Apply messages (sequence, payload) in order and record the stream position."""
        result = ApplyResult()
        conn.execute("BEGIN IMMEDIATE")
        try:
            self._refresh(conn)
            conn.execute(f"UPDATE {ddl.GUARD} SET applying = 1 WHERE id = 1")
            self._pending.refresh(conn, self._shapes)
            pending = self._pending
            for seq, data in messages:
                result.last_seq = seq
                result.messages += 1
                try:
                    batch = decode(data)
                except DecodeError as exc:
                    result.failed.append((seq, str(exc)))
                    continue
                result.origin_nodes.add(batch.node_id)
                conn.execute("SAVEPOINT msg")
                try:
                    for ch in batch.changes:
                        if self._apply_change(conn, batch, ch, pending):
                            result.rows += 1
                        else:
                            result.skipped_pending += 1
                except (sqlite3.Error, UnknownTable, ValueError) as exc:
                    conn.execute("ROLLBACK TO msg")
                    result.failed.append((seq, f"{type(exc).__name__}: {exc}"))
                conn.execute("RELEASE msg")
            if result.last_seq:
                conn.execute(
                    f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?) ON CONFLICT(stream) "
                    "DO UPDATE SET seq = max(seq, excluded.seq)",
                    (stream, result.last_seq),
                )
            conn.execute(f"UPDATE {ddl.GUARD} SET applying = 0 WHERE id = 1")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result
