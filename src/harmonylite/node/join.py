"""A node joining the cluster with a database of its own.

"Of its own": the database file exists, there is no sequence map, the database records no
position on any of the cluster's streams (it never ran harmonylite here, or ran an unrelated
cluster), and its replicated tables hold rows. Restoring the cluster's snapshot over it would
replace those rows, so it never happens silently; ``snapshot.join`` (or ``-join``) says what to do:

- ``refuse`` (the default): the node stops (exit 2) before anything touches the file, naming the
  database, the rows per table, the snapshot and the choices;
- ``replace``: a consistent copy of the file is kept beside it
  (``<db>.before-join-YYYYmmddTHHMMSSZ``, SQLite's backup API), then the snapshot is installed;
- ``merge``: the same copy, the snapshot installed, then the copy's rows are written into the
  database by the node's own connection, through the capture triggers: they are this node's
  local changes, published like any other, and applied after the snapshot's rows on every node
  (so where a key is in both, the joiner's row wins). A marker file (``<db>.join-merge``) naming
  the copy makes the merge survive a crash between the install and its commit.

A database with rows of its own and no snapshot in the store is not replaced: it keeps its rows
and replays the streams, as before. Rows written without capture are not published; with
``merge`` they are (each row is written again through the triggers).

Called by the node: :func:`check` before anything opens the database for writing,
:func:`guard` and :func:`before_install` by the recovery, :func:`finish` once capture is installed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harmonylite.cdc import changelog, takeover
from harmonylite.cdc.install import install
from harmonylite.cdc.schema import TableInfo, table_info, user_tables
from harmonylite.config import Config
from harmonylite.db.connection import PREFIX, fetch_all, quote_ident, write_transaction
from harmonylite.errors import HarmonyliteError, JoinRefused, StorageError
from harmonylite.node.install import remove_durably
from harmonylite.replication.seqmap import read_seq_map
from harmonylite.snapshot.storage import open_store

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".join-merge"
COPY_INFIX = ".before-join-"


@dataclass(frozen=True)
class OwnData:
    """Rows per replicated table of a database that holds no position on the cluster's streams."""

    rows: dict[str, int]

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def __str__(self) -> str:
        return ", ".join(f"{t}: {_rows(n)}" for t, n in sorted(self.rows.items()))


@dataclass
class Joining:
    """What :func:`check` found at start, and what the recovery did about it."""

    own: OwnData
    mode: str
    copy: Path | None = None


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def marker_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + MARKER_SUFFIX)


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
    conn = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        positions = changelog.applied_sequences(conn)
        # (A restored snapshot records its positions even at 0, a stream it never saw.)
        if any(s in positions for s in cfg.stream_names()):
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


def refusal(db_path: Path, own: OwnData, snapshot_id: str) -> str:
    return (
        f"refusing to start: database {db_path} holds rows of its own ({own}) and no position "
        f"on the cluster's streams, and installing the cluster's snapshot {snapshot_id} would "
        f"replace them. Choose one: join = \"replace\" in [snapshot] (or -join replace) "
        "installs the snapshot, keeping a copy of this file beside it; join = \"merge\" (or "
        "-join merge) installs the snapshot, then publishes this file's rows as this node's own "
        "changes (its row wins where a key is in both), keeping a copy too; or move the file "
        "away to start from the snapshot alone. Nothing was changed: the database was left "
        "untouched")


async def check(node: Node) -> Joining | None:
    """At start, before the database is opened for writing: find rows of its own; when the
    store holds a snapshot and the operator chose nothing, refuse (JoinRefused)."""
    from harmonylite.node.recovery import list_patiently  # (recovery imports this module)

    cfg = node.cfg
    own = await asyncio.to_thread(own_data, cfg, node.db_path, node.seq_map_path)
    if own is None:
        return None
    # The database was not replaced yet: a merge left over from an earlier try has no object.
    await asyncio.to_thread(remove_durably, marker_path(node.db_path))
    store = await open_store(cfg.snapshot, js=node.js, bucket=cfg.snapshot_bucket())
    try:
        newest = (await list_patiently(store))[:1]
    except StorageError as exc:
        # The recovery lists again and calls guard() before installing anything.
        log.warning("cannot list snapshots to check whether %s would be replaced: %s",
                    node.db_path, exc)
        newest = []
    finally:
        await store.aclose()
    joining = Joining(own, cfg.snapshot.join)
    if newest:
        guard(joining, node.db_path, newest[0].id)
        log.warning("database %s holds rows of its own (%s); snapshot.join = %s: %s", node.db_path,
                    own, joining.mode, "it is replaced by the cluster's snapshot, a copy kept"
                    if joining.mode == "replace" else "its rows are merged into the cluster's "
                    "snapshot", extra={"path": str(node.db_path), "rows": own.total})
    return joining


def guard(joining: Joining, db_path: Path, snapshot_id: str) -> None:
    """Refuse to install ``snapshot_id`` over a database of its own unless the operator chose."""
    if joining.mode == "refuse":
        raise JoinRefused(refusal(db_path, joining.own, snapshot_id))


async def before_install(joining: Joining, db_path: Path) -> None:
    """Right before the snapshot is installed (a verified one is at hand): keep the copy, and
    for a merge the marker naming it (so a crash after the install still merges)."""
    if joining.copy is not None:
        return  # an install tried again
    joining.copy = await asyncio.to_thread(keep_copy, db_path)
    log.warning("kept a copy of %s before replacing it with the cluster's snapshot: %s",
                db_path, joining.copy, extra={"path": str(joining.copy)})
    if joining.mode == "merge":
        await asyncio.to_thread(_write_marker, marker_path(db_path), joining.copy)


def keep_copy(db_path: Path) -> Path:
    """A consistent copy of ``db_path`` beside it, with SQLite's backup API (fsynced, then
    renamed into place: a copy that exists is whole)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = db_path.with_name(f"{db_path.name}{COPY_INFIX}{stamp}")
    n = 1
    while copy.exists():
        n += 1
        copy = db_path.with_name(f"{db_path.name}{COPY_INFIX}{stamp}-{n}")
    tmp = copy.with_name(f".{copy.name}.tmp")
    src = sqlite3.connect(str(db_path), isolation_level=None)
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        dest = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            src.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")  # one standalone file
        finally:
            dest.close()
    finally:
        src.close()
    _fsync(tmp)
    os.replace(tmp, copy)
    _fsync(copy.parent)
    return copy


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(marker: Path, copy: Path) -> None:
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"copy": str(copy)}))
    _fsync(tmp)
    os.replace(tmp, marker)
    _fsync(marker.parent)


def _read_marker(marker: Path) -> Path | None:
    try:
        data = json.loads(marker.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise HarmonyliteError(f"{marker} is not a merge marker ({exc}): it names the copy whose "
                               "rows are to be merged; remove it once they are") from exc
    return Path(str(data["copy"]))


async def finish(node: Node, restored: str | None) -> None:
    """Once capture is installed: merge what a merge left to do (the marker's copy into the
    restored database, or a database that kept its rows republished in place), or say that a
    database kept its rows without publishing them."""
    joining = node.joining
    db_path, cfg = node.db_path, node.cfg
    copy = await asyncio.to_thread(_read_marker, marker_path(db_path))
    if copy is not None:
        if not copy.exists():
            raise HarmonyliteError(f"cannot merge the rows of {copy} into {db_path}: the copy is "
                                   f"gone; remove {marker_path(db_path)} to start without them")
        merged = await node.writer.call(lambda c: merge_rows(c, copy, cfg))
        await asyncio.to_thread(remove_durably, marker_path(db_path))
        log.warning("merged %s from %s into %s as this node's own changes", _rows(merged), copy,
                    db_path, extra={"path": str(copy), "rows": merged})
        return
    if joining is None or restored is not None:
        return
    if joining.mode == "merge":
        merged = await node.writer.call(lambda c: republish(c, joining.own))
        log.warning("merged %s of %s (%s) into the cluster as this node's own changes",
                    _rows(merged), db_path, joining.own, extra={"rows": merged})
    else:
        log.warning("database %s keeps the rows of its own and replays the streams; its %s "
                    "(%s) are not published: they stay on this node only (join = \"merge\" "
                    "publishes them)", db_path, _rows(joining.own.total), joining.own,
                    extra={"rows": joining.own.total})


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
    src = sqlite3.connect(f"file:{copy}?mode=ro", uri=True, isolation_level=None)
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
