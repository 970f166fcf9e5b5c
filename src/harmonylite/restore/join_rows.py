"""Which rows a database holds of its own, and writing rows into the live database through
change capture: the SQLite side of joining the cluster (the decisions are in
:mod:`harmonylite.restore.join`). Nothing here runs on the event loop; callers use worker threads.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonylite.bus.names import namespace
from harmonylite.cdc import changelog, takeover
from harmonylite.cdc.install import install
from harmonylite.cdc.schema import TableInfo, table_info, user_tables
from harmonylite.config import Config
from harmonylite.db.connection import (
    PREFIX,
    fetch_all,
    plain_connection,
    quote_ident,
    write_transaction,
)
from harmonylite.errors import HarmonyliteError
from harmonylite.replication.seqmap import read_seq_map

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OwnData:
    """Rows per replicated table of a database that holds no position on the cluster's streams."""

    rows: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def __str__(self) -> str:
        return ", ".join(f"{t}: {rows_text(n)}" for t, n in sorted(self.rows.items()))


def rows_text(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def _has_seq_map(path: Path) -> bool:
    try:
        return read_seq_map(path) is not None
    except HarmonyliteError:
        return False  # the recovery ignores it too (and says so)


def _inherits_harmonylite_positions(conn: sqlite3.Connection) -> bool:
    """A database HarmonyLite ran on takes its positions from HarmonyLite's sequence map at
    start (see :mod:`harmonylite.cdc.takeover`): it is taken over, not joining."""
    if not takeover.HARMONYLITE_SEQ_MAP.is_file():
        return False
    names = [str(r[0]) for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, ?) = ?",
        (len(PREFIX), PREFIX))]
    return any(n == takeover.GLOBAL or n.endswith(takeover.SUFFIX) for n in names)


def own_data(cfg: Config, db_path: Path, seq_map_path: Path) -> OwnData | None:
    """The rows of a database of its own (see the module docstring), or None.

    Reads only, on a plain connection that changes nothing (not even the journal mode): a node
    that refuses leaves the file exactly as it was.
    """
    if not db_path.exists() or _has_seq_map(seq_map_path):
        return None
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        positions = changelog.applied_sequences(conn)
        # (A restored snapshot records its positions even at 0, a stream it never saw.)
        if any(s in positions for s in namespace(cfg).streams()):
            return None
        if _inherits_harmonylite_positions(conn):
            return None
        rows: dict[str, int] = {}
        for table in user_tables(conn)[0]:
            if not cfg.replicates_table(table.name):
                continue
            count = int(conn.execute(
                f"SELECT count(*) FROM {quote_ident(table.name)}").fetchone()[0])
            if count:
                rows[table.name] = count
    finally:
        conn.close()
    return OwnData(rows) if rows else None


def lacking_rows(db_path: Path, snapshot: Path, own: OwnData) -> OwnData | None:
    """Per table of ``own``, the rows of ``db_path`` not in ``snapshot`` as they are (reading
    only, on a plain connection: the database file is not changed)."""
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        conn.execute("ATTACH DATABASE ? AS snap", (str(snapshot),))
        rows: dict[str, int] = {}
        for name, count in own.rows.items():
            q = quote_ident(name)
            mine = [str(c[1]) for c in conn.execute(f"PRAGMA main.table_xinfo({q})") if not c[6]]
            theirs = {str(c[1]) for c in conn.execute(f"PRAGMA snap.table_xinfo({q})")}
            if not theirs or any(c not in theirs for c in mine):
                rows[name] = count
                continue
            cols = ", ".join(map(quote_ident, mine))
            lacking = int(conn.execute(f"SELECT count(*) FROM (SELECT {cols} FROM main.{q} "
                                       f"EXCEPT SELECT {cols} FROM snap.{q})").fetchone()[0])
            if lacking:
                rows[name] = lacking
    finally:
        conn.close()
    return OwnData(rows) if rows else None


def republish(conn: sqlite3.Connection, own: OwnData) -> int:
    """Write every row of ``own``'s tables again (to itself) through the capture triggers."""
    done = 0
    with write_transaction(conn):
        for name in sorted(own.rows):
            table = table_info(conn, name)
            first = quote_ident(table.pk[0])
            done += conn.execute(f"UPDATE {quote_ident(name)} SET {first} = {first}").rowcount
    return done


def merge_rows(conn: sqlite3.Connection, copy: Path, cfg: Config) -> int:
    """Write the rows of the copy's replicated tables into the live database (``conn``, the
    node's writer: captured) in one transaction. Where a key is in both, the copy's row is
    written over the live one; a table only the copy has is created first. A row the live
    database refuses (a constraint) is logged with its table and key, and stays in the copy."""
    src = plain_connection(copy, readonly=True)
    try:
        # (An empty table of the copy changes nothing: the snapshot's schema stands.)
        tables = [t for t in user_tables(src)[0] if cfg.replicates_table(t.name)
                  and src.execute(f"SELECT 1 FROM {quote_ident(t.name)} LIMIT 1").fetchone()]
        live = {t.name for t in user_tables(conn)[0]}
        missing = [t.name for t in tables if t.name not in live]
        if missing:
            with write_transaction(conn):
                for name in missing:
                    for (sql,) in src.execute(
                            "SELECT sql FROM sqlite_master WHERE tbl_name = ? AND sql IS NOT NULL "
                            "ORDER BY type = 'table' DESC", (name,)):
                        conn.execute(str(sql))
            log.warning("created table(s) %s, which the cluster's snapshot lacks, from %s: the "
                        "other nodes keep their changes parked until they create them too",
                        ", ".join(missing), copy)
            install(conn, cfg.replicates_table)  # capture on the new tables
        done = 0
        with write_transaction(conn):
            for table in tables:
                done += _merge_table(conn, src, table, table_info(conn, table.name))
        return done
    finally:
        src.close()


def _merge_table(conn: sqlite3.Connection, src: sqlite3.Connection, old: TableInfo,
                 new: TableInfo) -> int:
    cols = [c for c in old.columns if c in new.columns]
    dropped = [c for c in old.columns if c not in new.columns]
    q = quote_ident(new.name)
    rows = fetch_all(src, f"SELECT {', '.join(map(quote_ident, old.columns))} FROM "
                     f"{quote_ident(old.name)}")
    if dropped and any(r[old.columns.index(c)] is not None for r in rows for c in dropped):
        log.warning("table %r of the cluster has no column(s) %s: their values are not merged "
                    "(they stay in the copy)", new.name, ", ".join(dropped),
                    extra={"table": new.name})
    if not cols:
        log.warning("table %r of the cluster shares no column with the copy's: its rows are not "
                    "merged (they stay in the copy)", new.name, extra={"table": new.name})
        return 0
    keyed = not new.content_keyed and all(k in cols for k in new.pk)
    key_cols = list(new.pk) if keyed else cols
    where = " AND ".join(f"{quote_ident(c)} IS ?" for c in key_cols)
    # The key columns are not set again: a row's key stays, only its other values change.
    settable = [c for c in cols if c not in key_cols] if keyed else []
    sets = ", ".join(f"{quote_ident(c)} = ?" for c in settable) or \
        f"{quote_ident(key_cols[0])} = {quote_ident(key_cols[0])}"
    insert = (f"INSERT INTO {q}({', '.join(map(quote_ident, cols))}) "
              f"VALUES ({', '.join('?' for _ in cols)})")
    done = 0
    for row in rows:
        values: list[Any] = [row[old.columns.index(c)] for c in cols]
        key = [values[cols.index(c)] for c in key_cols]
        try:
            if keyed:
                if conn.execute(f"UPDATE {q} SET {sets} WHERE {where}",
                                [*(values[cols.index(c)] for c in settable), *key]
                                ).rowcount == 0:
                    conn.execute(insert, values)
            elif conn.execute(f"SELECT 1 FROM {q} WHERE {where}", key).fetchone() is None:
                conn.execute(insert, values)  # identified by content: present means merged
            else:
                continue
        except sqlite3.IntegrityError as exc:
            log.error("row of table %r with key %s not merged (%s): it stays in the copy",
                      new.name, key if keyed else values, exc, extra={"table": new.name})
            continue
        done += 1
    return done
