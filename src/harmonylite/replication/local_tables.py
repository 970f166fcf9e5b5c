"""This database's tables as the applier sees them: their description, how a sender's column list
maps onto each, and the prepared SQL per shape of change; kept until the schema moves.

The applier checks ``PRAGMA schema_version`` in each of its transactions (``moved``) and, when it
moved, brings capture up to date before it calls ``reload``: every cached statement of the old
schema goes. One instance per applier, used on the writer's thread only.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from harmonylite.cdc import changelog
from harmonylite.cdc.schema import TableInfo, fold_key, table_info
from harmonylite.replication import large_values, statements

NEVER_READ = -1  # ``version`` before the first transaction
FORGOTTEN = -2  # ``version`` once a replicated schema change was applied (reload due)


@dataclass(frozen=True)
class ChangeShape:
    fits: bool  # every column the sender has, this table has
    remote_key: tuple[int, ...]  # positions of the sender's key columns
    local_key: tuple[int, ...]  # positions of this table's key columns (empty: not all sent)
    kept: tuple[int, ...]  # positions of the columns this table has
    kept_cols: tuple[str, ...]


class LocalTables:
    """The tables lookup of the applier and its parts."""

    def __init__(self, replicated: Callable[[str], bool] | None = None) -> None:
        self.version = NEVER_READ  # PRAGMA schema_version the caches hold
        self.shapes: dict[int, changelog.TableShape] = {}  # the change log's tables
        self.replicated = replicated  # tables replicated here (None: all)
        self._tables: dict[str, TableInfo | None] = {}
        self._sql: dict[tuple[str, tuple[str, ...], int, tuple[bool, ...] | None,
                              tuple[bool, ...] | None], statements.Statements] = {}
        self._rowid: dict[str, bool] = {}  # table -> blob I/O can address its rows
        self._shapes_seen: dict[tuple[str, tuple[str, ...], tuple[str, ...]], ChangeShape] = {}
        self._replicated_cache: dict[str, bool] = {}  # table -> replicated (patterns cost)

    def moved(self, conn: sqlite3.Connection) -> bool:
        """Whether the schema changed since ``reload`` (always, before the first)."""
        return bool(conn.execute("PRAGMA schema_version").fetchone()[0] != self.version)

    def reload(self, conn: sqlite3.Connection) -> None:
        """Drop what was cached of the old schema (capture is up to date by now)."""
        self.version = conn.execute("PRAGMA schema_version").fetchone()[0]
        self._tables.clear()
        self._sql.clear()
        self._rowid.clear()
        self._shapes_seen.clear()
        self.shapes = changelog.registry(conn)

    def forget(self) -> None:
        """A schema change was applied: the next transaction reloads."""
        self.version = FORGOTTEN

    def replicates(self, table: str) -> bool:
        found = self._replicated_cache.get(table)
        if found is None:
            found = self._replicated_cache[table] = (
                self.replicated is None or self.replicated(table))
        return found

    def known_replicated(self, table: str) -> bool:
        """Whether ``table`` was found replicated already (False: not asked yet, or not)."""
        return bool(self._replicated_cache.get(table))

    def local(self, conn: sqlite3.Connection, table: str) -> TableInfo | None:
        if table not in self._tables:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            self._tables[table] = table_info(conn, table) if exists else None
        return self._tables[table]

    def local_pk(self, conn: sqlite3.Connection, table: str) -> tuple[str, ...] | None:
        local = self.local(conn, table)
        return tuple(local.pk) if local is not None and not local.content_keyed else None

    def columns(self, conn: sqlite3.Connection, table: str) -> set[str] | None:
        local = self.local(conn, table)
        return set(local.columns) if local is not None else None

    def folder(self, conn: sqlite3.Connection
               ) -> Callable[[str, tuple[object, ...]], tuple[object, ...]]:
        """Keys of local pending changes as their table's collations compare them."""
        def fold(table: str, key: tuple[object, ...]) -> tuple[object, ...]:
            local = self.local(conn, table)
            return fold_key(key, local.key_collations) if local is not None else key
        return fold

    def shape(self, local: TableInfo | None, remote_cols: tuple[str, ...],
              remote_keys: tuple[str, ...]) -> ChangeShape | None:
        """How a sender's column list maps onto the local table (cached: once per shape)."""
        if local is None:
            return None
        ck = (local.name, remote_cols, remote_keys)
        found = self._shapes_seen.get(ck)
        if found is None:
            have = set(local.columns)
            kept = tuple(i for i, c in enumerate(remote_cols) if c in have)
            found = ChangeShape(
                fits=len(kept) == len(remote_cols),
                remote_key=tuple(remote_cols.index(c) for c in remote_keys),
                local_key=tuple(remote_cols.index(c) for c in local.pk)
                if all(c in remote_cols for c in local.pk) else (),
                kept=kept, kept_cols=tuple(remote_cols[i] for i in kept))
            self._shapes_seen[ck] = found
        return found

    def statements(self, local: TableInfo, columns: tuple[str, ...], op: int,
                   mask: tuple[bool, ...] | None,
                   zero: tuple[bool, ...] | None = None) -> statements.Statements:
        key = (local.name, columns, op, mask, zero)
        cached = self._sql.get(key)
        if cached is None:
            cached = self._sql[key] = statements.build(local, columns, op, mask, zero)
        return cached

    def has_rowid(self, conn: sqlite3.Connection, local: TableInfo) -> bool:
        found = self._rowid.get(local.name)
        if found is None:
            found = self._rowid[local.name] = large_values.has_rowid(conn, local)
        return found
