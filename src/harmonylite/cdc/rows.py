"""Turning change-log entries into changes: the row of each key, as it is now.

The triggers record only table, key and operation; the publisher reads each row when it
publishes (DESIGN rule 17). Applying is state-based, so sending a row's newest state in place of
an intermediate one is safe, and several changes to one row in a batch collapse into one. The
columns are the table's columns now: a column the application added, renamed or dropped since the
change was captured can never shift values into other columns.

Reads run inside the publisher's transaction that also records what it sends, so the rows and the
log agree (nothing commits in between).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.changelog import Change, Entry, TableShape
from harmonylite.cdc.schema import table_info
from harmonylite.db.connection import RawText, fetch_all, quote_ident

log = logging.getLogger(__name__)

IN_BATCH = 500  # keys per ``IN (...)`` query: well under SQLite's limit on bound parameters


def table_hash(conn: sqlite3.Connection, name: str) -> str:
    """A short hash of a table's columns (names, declared types) and key: equal on two nodes
    when their tables have the same shape."""
    cols = conn.execute(f"PRAGMA table_xinfo({quote_ident(name)})").fetchall()
    text = "\0".join(f"{c[1]}:{str(c[2]).upper()}:{c[5]}" for c in cols if c[6] == 0)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class RowReader:
    """Reads current rows by key; the table shapes are cached per schema version."""

    def __init__(self) -> None:
        self._version = -1
        self._shapes: dict[str, TableShape | None] = {}
        self._select: dict[str, str] = {}
        self._keys: dict[str, list[str]] = {}
        self._exact: set[str] = set()  # single INTEGER key: an integer key matches exactly
        self._warned: set[str] = set()

    def _refresh(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version != self._version:
            self._version = version
            self._shapes.clear()
            self._select.clear()
            self._keys.clear()
            self._exact.clear()

    def shape(self, conn: sqlite3.Connection, table: str) -> TableShape | None:
        if table not in self._shapes:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            if not exists:
                self._shapes[table] = None
                return None
            info = table_info(conn, table)
            shape = TableShape(table, info.columns, info.pk, table_hash(conn, table),
                               content_keyed=info.content_keyed,
                               single_order=bool(info.unique_indexes),
                               key_collations=info.key_collations)
            self._shapes[table] = shape
            cols = ", ".join(quote_ident(c) for c in info.columns)
            self._select[table] = f"SELECT {cols} FROM {quote_ident(table)} WHERE "
            self._keys[table] = [quote_ident(c) for c in info.pk]
            if len(info.pk) == 1 and not info.content_keyed:
                declared = {r[1]: str(r[2]).upper() for r in conn.execute(
                    f"PRAGMA table_xinfo({quote_ident(table)})")}
                if declared.get(info.pk[0]) == "INTEGER":
                    self._exact.add(table)
        return self._shapes[table]

    def _warn_once(self, name: str, text: str) -> None:
        if name not in self._warned:
            self._warned.add(name)
            log.warning(text, name, extra={"table": name})

    def _query(self, table: str, key: tuple[object, ...]) -> str:
        # Text that is not UTF-8 travels as bytes: cast back to TEXT to find its row.
        return self._select[table] + " AND ".join(
            f"{k} IS CAST(? AS TEXT)" if type(v) is RawText else f"{k} IS ?"
            for k, v in zip(self._keys[table], key, strict=True))

    def _rows_of(self, conn: sqlite3.Connection, table: str, keys: list[object],
                  ) -> dict[object, tuple[object, ...]]:
        """The rows of a table with a one-column key, read with one query per ``IN_BATCH``
        keys rather than one per key, filed by their key as stored (type and value). A key
        asked for that finds no row filed under it as it is (the query matched under the
        column's affinity or collation, text ``'1'`` for ``1``, ``'ABC'`` for ``'abc'`` under
        NOCASE; or there is none) is looked up alone, as every key was before."""
        shape = self._shapes[table]
        assert shape is not None
        at = shape.pk_indexes[0]
        found: dict[object, tuple[object, ...]] = {}
        for i in range(0, len(keys), IN_BATCH):
            part = keys[i:i + IN_BATCH]
            sql = (self._select[table] + self._keys[table][0]
                   + f" IN ({', '.join('?' * len(part))})")
            for row in fetch_all(conn, sql, tuple(part)):
                key = row[at]
                if type(key) in (int, str):
                    found[(type(key), key)] = tuple(row)
        return found

    def _prefetch(self, conn: sqlite3.Connection, entries: list[Entry],
                  registry: dict[int, TableShape],
                  ) -> dict[str, dict[object, tuple[object, ...]]]:
        """The rows of the tables with a one-column key that several entries touch."""
        wanted: dict[str, list[object]] = {}
        for e in entries:
            if len(e.key) == 1 and type(e.key[0]) in (int, str):
                wanted.setdefault(registry[e.tid].name, []).append(e.key[0])
        out: dict[str, dict[object, tuple[object, ...]]] = {}
        for name, keys in wanted.items():
            shape = self.shape(conn, name)
            if len(keys) < 2 or shape is None or shape.content_keyed or len(shape.pk) != 1:
                continue
            out[name] = self._rows_of(conn, name, keys)
        return out

    def _row(self, conn: sqlite3.Connection, name: str, key: tuple[object, ...],
             read: dict[str, dict[object, tuple[object, ...]]]) -> tuple[object, ...] | None:
        """The row of ``key`` as it is now (None: there is none)."""
        rows = read.get(name)
        if rows is not None and len(key) == 1:
            k = key[0]
            row = rows.get((type(k), k))
            if row is not None:
                return row
            if type(k) is int and name in self._exact:
                return None  # an integer key compares exactly: the row is gone
        found = fetch_all(conn, self._query(name, key), key)
        return tuple(found[0]) if found else None

    def changes(self, conn: sqlite3.Connection, entries: list[Entry],
                registry: dict[int, TableShape]) -> tuple[list[Change], dict[str, TableShape]]:
        """The changes to send for ``entries`` (the last per row, with the row as it is now),
        and the shape of each table they touch."""
        self._refresh(conn)
        last: dict[tuple[int, tuple[object, ...]] | int, Entry] = {}
        for e in entries:
            if registry[e.tid].pk == registry[e.tid].columns:
                # The key is the whole row (no primary key, or one of every column): the entry
                # carries the row, and equal rows may repeat, so nothing collapses.
                last[e.id] = e
                continue
            last.pop((e.tid, e.key), None)  # keep the order of each row's last change
            last[(e.tid, e.key)] = e
        out: list[Change] = []
        shapes: dict[str, TableShape] = {}
        ordered = sorted(last.values(), key=lambda e: e.id)
        read = self._prefetch(conn, ordered, registry)
        for e in ordered:
            name = registry[e.tid].name
            shape = self.shape(conn, name)
            if shape is None or len(shape.pk) != len(e.key):
                self._warn_once(name, "changes to table %r are not published: the table no "
                                "longer exists here (dropped or renamed)")
                continue
            shapes[name] = shape
            if shape.content_keyed:
                if shape.pk != registry[e.tid].pk:  # columns changed since it was captured
                    self._warn_once(name, "a captured change to table %r was made with other "
                                    "columns than the table has now: it is not published")
                    continue
                op = ddl.OP_INSERT if e.op == ddl.OP_BACKFILL else e.op
                out.append(Change(e.id, name, op, e.key))
                continue
            # Read even for a delete: a delete logged ahead of an ``OR REPLACE`` that did not
            # remove the row after all (see ``ddl.replace_trigger_ddl``) finds it still here.
            row = self._row(conn, name, e.key, read)
            if row is None:  # deleted (now, if not then): send the key alone
                out.append(Change(e.id, name, ddl.OP_DELETE, _key_only(shape, e.key)))
            else:
                op = ddl.OP_UPDATE if e.op in (ddl.OP_BACKFILL, ddl.OP_DELETE) else e.op
                out.append(Change(e.id, name, op, row))
        return out, shapes


def _key_only(shape: TableShape, key: tuple[object, ...]) -> tuple[object, ...]:
    values: list[object] = [None] * len(shape.columns)
    for i, v in zip(shape.pk_indexes, key, strict=True):
        values[i] = v
    return tuple(values)


def read_changes(conn: sqlite3.Connection, after: int, limit: int,
                 upto: int | None = None) -> tuple[list[Change], dict[str, TableShape]]:
    """Entries after ``after`` as changes to send, with their tables' shapes (one-off reads)."""
    registry = changelog.registry(conn)
    entries = changelog.read_entries(conn, after, limit, registry, upto)
    return RowReader().changes(conn, entries, registry)
