"""Reading pending changes, marking them published, pruning, and reading applied sequences."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from harmonylite.cdc import ddl
from harmonylite.db.connection import fetch_all


@dataclass(frozen=True)
class TableShape:
    name: str
    columns: tuple[str, ...]
    pk: tuple[str, ...]
    schema_hash: str = ""  # of the table's columns and key, as sent with its changes
    content_keyed: bool = False  # no primary key: the whole row is the key
    single_order: bool = False  # a secondary UNIQUE constraint: all its changes in one stream
    key_collations: tuple[str, ...] = ()  # how the key compares (see schema.fold_key)

    @property
    def pk_indexes(self) -> tuple[int, ...]:
        return tuple(self.columns.index(c) for c in self.pk)


@dataclass(frozen=True)
class Change:
    id: int
    table: str
    op: int
    values: tuple[object, ...]  # aligned with the table's columns; deletes carry only the key


@dataclass(frozen=True)
class Entry:
    """One row of the change log: which table (by tid), which operation, which key."""

    id: int
    tid: int
    op: int
    key: tuple[object, ...]


def registry(conn: sqlite3.Connection) -> dict[int, TableShape]:
    rows = conn.execute(f"SELECT tid, name, columns, pk FROM {ddl.TABLES}").fetchall()
    return {
        int(tid): TableShape(name, tuple(json.loads(cols)), tuple(json.loads(pk)))
        for tid, name, cols, pk in rows
    }


def shapes_by_name(conn: sqlite3.Connection) -> dict[str, TableShape]:
    return {s.name: s for s in registry(conn).values()}


def watermark(conn: sqlite3.Connection) -> int:
    row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'published'").fetchone()
    return int(row[0]) if row else 0


def read_entries(
    conn: sqlite3.Connection, after: int, limit: int, shapes: dict[int, TableShape],
    upto: int | None = None,
) -> list[Entry]:
    """Up to ``limit`` change-log entries with id > ``after`` (and <= ``upto``), oldest first."""
    rows = fetch_all(
        conn, f"SELECT * FROM {ddl.LOG} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
        (after, upto if upto is not None else 2**63 - 1, limit),
    )
    return [_entry(conn, row, shapes) for row in rows]


def _entry(conn: sqlite3.Connection, row: tuple[object, ...],
           shapes: dict[int, TableShape]) -> Entry:
    tid = int(row[1])  # type: ignore[call-overload]
    shape = shapes.get(tid)
    if shape is None:
        shapes.update(registry(conn))
        shape = shapes[tid]
    return Entry(int(row[0]), tid, int(row[2]),  # type: ignore[call-overload]
                 tuple(row[3 : 3 + len(shape.pk)]))


def intent(conn: sqlite3.Connection) -> int:
    """Last change id of the batch being published (0 when none was recorded)."""
    row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'publishing'").fetchone()
    return int(row[0]) if row else 0


def set_intent(conn: sqlite3.Connection, upto: int, epoch: str = "") -> None:
    """Record the batch about to be published: its last change id and the epoch it goes out
    under (a re-send after a crash must use the same message ids)."""
    conn.executemany(
        f"INSERT INTO {ddl.STATE}(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET "
        "v = excluded.v", [("publishing", upto), ("publishing_epoch", epoch)]
    )


def intent_epoch(conn: sqlite3.Connection) -> str:
    """The epoch the recorded batch went out under ("" when unknown)."""
    row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'publishing_epoch'").fetchone()
    return str(row[0]) if row and row[0] else ""


def pending_count(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        f"SELECT count(*) FROM {ddl.LOG} WHERE id > (SELECT v FROM {ddl.STATE} "
        "WHERE k = 'published')"
    ).fetchone()
    return int(row[0])


def mark_published(conn: sqlite3.Connection, upto: int) -> None:
    conn.execute(
        f"UPDATE {ddl.STATE} SET v = max(v, ?) WHERE k = 'published'", (upto,)
    )


def prune(conn: sqlite3.Connection, keep_from: int | None = None) -> int:
    """Delete published changes, keeping the newest of them and every one from ``keep_from``
    on (still on its way back from the stream, see ``replication.own_returns``).

    Change ids are rowids, which SQLite allocates as max(rowid) + 1: emptying the table would
    restart them below the watermark and new changes would look published. Keeping the newest
    published row keeps ids increasing.
    """
    cur = conn.execute(
        f"DELETE FROM {ddl.LOG} WHERE id < (SELECT v FROM {ddl.STATE} WHERE k = 'published') "
        "AND id < ?", (keep_from if keep_from is not None else 2**62,))
    return cur.rowcount


class PendingKeys:
    """(table, key) of every row whose newest local change has not been sent yet, and of every
    row with a local change that has not come back from the stream yet.

    Only changes above the publisher's intent count as not sent: those are certain to reach the
    stream after anything this node receives now. A change already handed to the publisher may
    sit anywhere in the stream relative to an incoming one, so it must not hide it. (The
    publisher records its intent in its own write transaction, which cannot commit while the
    applier holds the write lock, so the two never disagree about which changes were sent.)

    A local change handed to the publisher still decides its row once it comes back: when this
    node's own older change to the row comes back first, it carries an older state of the row,
    and writing it would take the row back until the newer one arrives (an application that
    reads and writes meanwhile, ``n = n + 1``, would lose its update). ``newest_own`` tells the
    applier which change to a row is this node's newest, so only that one is written.

    Each refresh reads only the changes captured since the previous one, so checking a batch of
    incoming messages against the local changes costs nothing when there are none. Changes the
    refreshes did not see (captured before this start, pruned before a refresh read them once
    they came back, or forgotten when too many were tracked) are below ``blind_upto``: the log
    is asked then (it keeps this start's changes until they are back, see
    ``replication.own_returns``).
    """

    OWN_LIMIT = 100_000  # rows tracked with a change not come back yet (memory bound)

    def __init__(self) -> None:
        self._latest: dict[tuple[str, tuple[object, ...]], int] = {}
        self._own: dict[tuple[str, tuple[object, ...]], int] = {}
        # Rows of ``_own`` that another node's change was written to after this node's newest
        # change to them (that change, back from the stream, must be written again).
        self._touched: set[tuple[str, tuple[object, ...]]] = set()
        self._scanned = -1
        self.blind_upto = 0  # own changes up to this id may be missing from ``_own``
        # The blind part of the log read once (see ``newer_in_log``): each row's newest id in
        # ids ``_blind_range`` (low exclusive, high inclusive).
        self._blind: dict[tuple[str, tuple[object, ...]], int] = {}
        self._blind_range: tuple[int, int] | None = None

    def refresh(self, conn: sqlite3.Connection, shapes: dict[int, TableShape],
                fold: Callable[[str, tuple[object, ...]], tuple[object, ...]] | None = None,
                ) -> None:
        published = watermark(conn)
        wm = max(published, intent(conn))
        if self._scanned < 0:  # first look: what was captured before is not known here
            self._scanned = self.blind_upto = wm
        rows = fetch_all(conn, f"SELECT * FROM {ddl.LOG} WHERE id > ? ORDER BY id",
                         (self._scanned,))
        if self._scanned < published - 1 and (not rows or int(rows[0][0]) > self._scanned + 1):
            # Published meanwhile, and pruning took some of it. Ids are allocated as max + 1
            # and pruning only deletes below the watermark (see ``prune``), so the log holds a
            # contiguous run of ids: when the next id is still there, nothing was missed.
            self.blind_upto = max(self.blind_upto, published - 1)
        for row in rows:
            entry = _entry(conn, row, shapes)
            self._scanned = entry.id
            shape = shapes[entry.tid]
            if shape.pk == shape.columns:
                continue  # identified by content (see ``rows``): nothing to take back
            name = shape.name
            key = fold(name, entry.key) if fold is not None else entry.key
            self._own[(name, key)] = entry.id
            self._touched.discard((name, key))
            if entry.op == ddl.OP_BACKFILL or entry.id <= wm:
                # A republished row is no newer than what arrives: it must not hide it (it is
                # read when published, so it carries what was applied meanwhile).
                continue
            self._latest[(name, key)] = entry.id
        if self._latest and min(self._latest.values()) <= wm:
            self._latest = {k: v for k, v in self._latest.items() if v > wm}
        if len(self._own) > self.OWN_LIMIT:
            self._own.clear()
            self._touched.clear()
            self.blind_upto = max(self.blind_upto, self._scanned)

    def newest_own(self, ident: tuple[str, tuple[object, ...]]) -> int | None:
        """The id of this node's newest change to the row that has not come back yet, as far
        as the refreshes saw (None: none seen)."""
        return self._own.get(ident)

    def newer_in_log(self, conn: sqlite3.Connection, ident: tuple[str, tuple[object, ...]],
                     change_id: int, shapes: dict[int, TableShape],
                     fold: Callable[[str, tuple[object, ...]], tuple[object, ...]]) -> bool:
        """Whether the log holds a change to the row newer than ``change_id``, for a change
        below ``blind_upto`` (the refreshes may have missed what followed it).

        The blind part of the log is read once into each row's newest id, and read further only
        for what it does not cover yet (an older change coming back on another shard, or a
        higher ``blind_upto``): a bulk load's changes coming back cost one pass over the log,
        not one pass each."""
        low, high = self._blind_range or (change_id, change_id)
        parts = [(a, b) for a, b in ((change_id, low), (high, self.blind_upto)) if a < b]
        for a, b in parts:
            for row in fetch_all(conn, f"SELECT * FROM {ddl.LOG} WHERE id > ? AND id <= ?",
                                 (a, b)):
                entry = _entry(conn, row, shapes)
                name = shapes[entry.tid].name
                row_ident = (name, fold(name, entry.key))
                if entry.id > self._blind.get(row_ident, 0):
                    self._blind[row_ident] = entry.id
        self._blind_range = (min(low, change_id), max(high, self.blind_upto))
        return self._blind.get(ident, 0) > change_id

    def blind_done(self) -> None:
        """A change above ``blind_upto`` came back: the map of the blind part may go (read
        again should a straggler of another shard need it)."""
        if self._blind_range is not None:
            self._blind.clear()
            self._blind_range = None

    def came_back(self, ident: tuple[str, tuple[object, ...]], change_id: int) -> None:
        """This node's change ``change_id`` to the row came back from the stream."""
        if self._own.get(ident, change_id + 1) <= change_id:
            del self._own[ident]
            self._touched.discard(ident)

    def touch(self, ident: tuple[str, tuple[object, ...]]) -> None:
        """A change of another node was written to the row."""
        if ident in self._own:
            self._touched.add(ident)

    def touched(self, ident: tuple[str, tuple[object, ...]]) -> bool:
        """Whether a change of another node was written to the row since this node's newest
        change to it: when that change comes back, the row here is not its state."""
        return ident in self._touched

    def __contains__(self, key: object) -> bool:
        return key in self._latest

    def __len__(self) -> int:
        return len(self._latest)


def applied_sequences(conn: sqlite3.Connection) -> dict[str, int]:
    try:
        rows = conn.execute(f"SELECT stream, seq FROM {ddl.SEQ}").fetchall()
    except sqlite3.OperationalError:
        return {}
    return {str(s): int(q) for s, q in rows}


def record_gap(conn: sqlite3.Connection, stream: str, first: int, last: int) -> None:
    """Remember that ``stream`` dropped messages ``first..last`` before this database applied
    them. Kept in the database (not in memory), so a restart still knows the node diverged; a
    restored snapshot replaces the database and with it the record."""
    conn.execute(
        f"INSERT INTO {ddl.STATE}(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v = "
        "CASE WHEN v LIKE '%-%' THEN substr(v, 1, instr(v, '-')) || excluded.v "
        "ELSE excluded.v END",
        (f"gap:{stream}", f"{first}-{last}"),
    )


def recorded_gaps(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """stream -> (first, last) of the messages it dropped before this database applied them."""
    try:
        rows = conn.execute(f"SELECT k, v FROM {ddl.STATE} WHERE k LIKE 'gap:%'").fetchall()
    except sqlite3.OperationalError:
        return {}
    out: dict[str, tuple[int, int]] = {}
    for k, v in rows:
        first, _, last = str(v).partition("-")
        out[str(k)[4:]] = (int(first), int(last.rsplit("-", 1)[-1]))
    return out


@contextlib.contextmanager
def replicating(conn: sqlite3.Connection) -> Iterator[None]:
    """The replicator's writes: the guard flag is set for the block, so the capture triggers (and
    the guarded application triggers) skip them, and cleared at its end. Used inside the write
    transaction only: no other connection ever sees the flag set, and a block that raises leaves
    it to the transaction's rollback."""
    conn.execute(f"UPDATE {ddl.GUARD} SET applying = 1 WHERE id = 1")
    yield
    conn.execute(f"UPDATE {ddl.GUARD} SET applying = 0 WHERE id = 1")
