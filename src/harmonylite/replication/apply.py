"""Applying change batches to the local database (runs on the writer's thread).

One transaction per group of messages: the changes, then the stream position in
``__harmonylite__seq``; so a crash re-applies at most an uncommitted suffix, which is harmless
because changes carry whole rows (DESIGN rule 2). Each message gets a savepoint, so one that cannot
be applied is rolled back alone, reported with its stream and sequence, and the rest go on.
Changes to a table this database does not have are parked in ``__harmonylite__parked``, in
arrival order, and applied once the table exists (``retry_parked``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import dataclass, field

import cbor2

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.schema import ROWID, TableInfo, table_info
from harmonylite.db.connection import quote_ident, write_transaction
from harmonylite.errors import DecodeError
from harmonylite.replication.event import Batch, RowChange, decode

log = logging.getLogger(__name__)


@dataclass
class ApplyResult:
    last_seq: int = 0
    messages: int = 0
    rows: int = 0
    skipped_pending: int = 0
    parked: int = 0  # changes to tables this database does not have, kept for later
    unparked: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)  # (sequence, reason)
    origin_nodes: set[int] = field(default_factory=set)
    published_at: float | None = None  # JetStream time of the last message, for the lag metric


class UnknownTable(Exception):
    """A statement was wanted for a table that vanished while the batch was being applied."""


APPLIED, SKIPPED, PARKED = 0, 1, 2


class Applier:
    """Holds prepared SQL per table shape; one instance per writer connection."""

    def __init__(self) -> None:
        self._tables: dict[str, TableInfo | None] = {}
        self._schema_version = -1
        self._sql: dict[tuple[str, tuple[str, ...], int], tuple[str, ...]] = {}
        self._shapes: dict[int, changelog.TableShape] = {}
        self._pending = changelog.PendingKeys()

    def _refresh(self, conn: sqlite3.Connection) -> bool:
        """Drop cached statements when the schema changed; True when it did."""
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version == self._schema_version:
            return False
        self._schema_version = version
        self._tables.clear()
        self._sql.clear()
        self._shapes = changelog.registry(conn)
        return True

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
                f"INSERT INTO {t}(rowid{', ' if cols else ''}{names}) "
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

    def _park(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
              ch: RowChange) -> None:
        conn.execute(
            f"INSERT INTO {ddl.PARKED}(stream, seq, tbl, op, columns, keys, vals) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (stream, seq, ch.table, ch.op, json.dumps(batch.columns[ch.table]),
             json.dumps(batch.keys[ch.table]), cbor2.dumps(list(ch.values))),
        )

    def _unpark(self, conn: sqlite3.Connection, pending: changelog.PendingKeys) -> int:
        """Apply, in arrival order, the parked changes whose table now exists."""
        rows = conn.execute(
            f"SELECT id, stream, seq, tbl, op, columns, keys, vals FROM {ddl.PARKED} ORDER BY id"
        ).fetchall()
        done: list[tuple[int]] = []
        for pid, stream, seq, table, op, cols, keys, vals in rows:
            if self._local(conn, table) is None:
                continue
            batch = Batch(0, {table: tuple(json.loads(cols))}, {table: tuple(json.loads(keys))},
                          [])
            conn.execute("SAVEPOINT parked")
            try:
                self._apply_change(conn, stream, seq, batch,
                                   RowChange(table, op, tuple(cbor2.loads(vals))), pending)
            except (sqlite3.Error, UnknownTable, ValueError) as exc:
                conn.execute("ROLLBACK TO parked")
                log.error("parked change from %s sequence %d to table %r cannot be applied, it "
                          "stays parked: %s", stream, seq, table, exc)
            else:
                done.append((pid,))
            conn.execute("RELEASE parked")
        conn.executemany(f"DELETE FROM {ddl.PARKED} WHERE id = ?", done)
        if done:
            log.info("applied %d parked changes now that their tables exist", len(done))
        return len(done)

    def _apply_change(
        self,
        conn: sqlite3.Connection,
        stream: str,
        seq: int,
        batch: Batch,
        ch: RowChange,
        pending: changelog.PendingKeys,
    ) -> int:
        remote_cols = batch.columns[ch.table]
        local = self._local(conn, ch.table)
        if local is None:
            # Not lost: kept in order until the table exists here (its later changes are parked
            # behind it, so applying them then gives the same final rows).
            self._park(conn, stream, seq, batch, ch)
            return PARKED
        key = tuple(ch.values[remote_cols.index(c)] for c in batch.keys[ch.table])
        if pending and (ch.table, key) in pending:
            # A local change to this row is not yet published; it will be published after this
            # message, so it is the row's final state everywhere. Applying this one now would only
            # make the row step back until then.
            return SKIPPED
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
                    return APPLIED
            conn.execute(stmts[1], (rowid, *others))
        else:
            conn.execute(stmts[0], vals)
        return APPLIED

    def retry_parked(self, conn: sqlite3.Connection) -> int:
        """Apply parked changes whose table appeared since the last look (a cheap no-op when
        the schema did not change)."""
        applied = 0
        with write_transaction(conn):
            if self._refresh(conn):
                conn.execute(f"UPDATE {ddl.GUARD} SET applying = 1 WHERE id = 1")
                self._pending.refresh(conn, self._shapes)
                applied = self._unpark(conn, self._pending)
                conn.execute(f"UPDATE {ddl.GUARD} SET applying = 0 WHERE id = 1")
        return applied

    def apply(
        self, conn: sqlite3.Connection, stream: str, messages: list[tuple[int, bytes]]
    ) -> ApplyResult:
        """Apply messages (sequence, payload) in order and record the stream position."""
        result = ApplyResult()
        with write_transaction(conn):
            schema_changed = self._refresh(conn)
            conn.execute(f"UPDATE {ddl.GUARD} SET applying = 1 WHERE id = 1")
            self._pending.refresh(conn, self._shapes)
            pending = self._pending
            if schema_changed:
                result.unparked = self._unpark(conn, pending)
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
                outcomes = [0, 0, 0]
                try:
                    for ch in batch.changes:
                        outcomes[self._apply_change(conn, stream, seq, batch, ch, pending)] += 1
                except (sqlite3.Error, UnknownTable, ValueError) as exc:
                    conn.execute("ROLLBACK TO msg")
                    result.failed.append((seq, f"{type(exc).__name__}: {exc}"))
                else:
                    result.rows += outcomes[APPLIED]
                    result.skipped_pending += outcomes[SKIPPED]
                    result.parked += outcomes[PARKED]
                    if outcomes[PARKED]:
                        tables = sorted({c.table for c in batch.changes
                                         if c.table not in self._tables
                                         or self._tables[c.table] is None})
                        log.warning("%s sequence %d: %d changes to %s parked: no such table "
                                    "here yet; they are applied once it exists", stream, seq,
                                    outcomes[PARKED], ", ".join(map(repr, tables)),
                                    extra={"stream": stream, "sequence": seq})
                conn.execute("RELEASE msg")
            if result.last_seq:
                conn.execute(
                    f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?) ON CONFLICT(stream) "
                    "DO UPDATE SET seq = max(seq, excluded.seq)",
                    (stream, result.last_seq),
                )
            conn.execute(f"UPDATE {ddl.GUARD} SET applying = 0 WHERE id = 1")
        return result
