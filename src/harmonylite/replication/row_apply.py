"""One change applied to one row: the table's shape against the sender's, the SQL, what a
change does to the rows around it (UNIQUE displacement, insert-insert conflicts), and when a
local change not yet sent supersedes it. The applier (:mod:`harmonylite.replication.apply`) owns
the transactions, the messages and the stream positions, and hands each change to
:class:`RowApplier`.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.schema import TableInfo, fold_key
from harmonylite.db.connection import fetch_all
from harmonylite.replication import (
    conflicts,
    content_rows,
    large_values,
    own_changes,
    statements,
)
from harmonylite.replication.deadletter import key_text
from harmonylite.replication.event import Batch, RowChange
from harmonylite.replication.local_tables import LocalTables
from harmonylite.replication.outcome import (
    APPLIED,
    PARKED,
    SKIPPED,
    UnknownTable,
)
from harmonylite.replication.own_changes import OwnOrigins
from harmonylite.replication.parking import ParkedChanges

log = logging.getLogger(__name__)


class RowApplier:
    """Writes one incoming change into its row (on the writer's thread, inside the applier's
    transaction, the guard flag set). Its parts: the tables lookup, this database's own
    origins, the rows with local changes not sent or not back (``pending``) and the parked
    changes (a change this database cannot take yet is parked behind them)."""

    def __init__(self, tables: LocalTables, own: OwnOrigins, pending: changelog.PendingKeys,
                 parked: ParkedChanges, *, skip_pending: bool = True) -> None:
        self.tables = tables
        self.own = own
        self.pending = pending
        self.parked = parked
        # With publish = false local changes are never sent, so they must not hide incoming ones.
        self.skip_pending = skip_pending
        self.displaced = 0  # rows removed by UNIQUE conflicts (recorded), since start
        self.provisional: set[tuple[str, str]] = set()  # rows with provisional conflicts
        self.marks: dict[str, int] = {}  # the origins' marks of the stream being applied
        # Past a shard-count change's cut: every own change published under the old count is
        # back (on whichever old stream carried it), see ``Applier.after_cut``.
        self.back_floor = 0
        self._cid = 0  # the id of the change being applied in its origin's log (0: unknown)
        self._ignored: set[str] = set()

    def load_provisional(self, conn: sqlite3.Connection) -> None:
        self.provisional = conflicts.provisional_keys(conn)

    def apply(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
              ch: RowChange, *, cid: int = 0, parked: bool = False) -> int:
        """Apply ``ch`` of ``batch`` (``cid``: its id in its origin's log, 0 when unknown;
        ``parked``: it comes out of the parked changes, or is a dead letter's retry). Returns
        its outcome (``outcome.APPLIED`` …); raises when it cannot be applied."""
        self._cid = cid
        try:
            return self._apply(conn, stream, seq, batch, ch, parked)
        finally:
            self._cid = 0

    def _apply(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
               ch: RowChange, parked: bool) -> int:
        table = ch.table
        remote_cols = batch.columns[table]
        pending = self.pending
        if not self.tables.replicates(table):
            if table not in self._ignored:  # each node's own (migration bookkeeping…)
                self._ignored.add(table)
                log.info("changes to table %r are not applied here: it is not replicated "
                         "(exclude_tables / include_tables)", table, extra={"table": table})
            return SKIPPED
        local = self.tables.local(conn, table)
        shape = self.tables.shape(local, remote_cols, batch.keys[table])
        if not parked and (shape is None or not shape.fits or table in self.parked.tables):
            # Not lost: kept in order until this database can take it (a table or a column it
            # lacks; or earlier changes to the table waiting), see ``parking``.
            self.parked.park(conn, stream, seq, batch, ch, table_here=shape is not None,
                             fits=shape is not None and shape.fits)
            return PARKED
        if local is None or shape is None:
            raise UnknownTable(f"no table {table!r} in the local database")
        own = self.own.made(batch)
        if local.content_keyed and own:
            return SKIPPED
        values = ch.values
        key = tuple(values[i] for i in shape.remote_key)
        if shape.fits:
            cols, vals = remote_cols, values
        else:  # a parked change whose sender has dropped these columns since (see parking)
            cols, vals = shape.kept_cols, tuple(values[i] for i in shape.kept)
        ident = (table, fold_key(key, local.key_collations)) if self.skip_pending else None
        if own and ident is not None and self._cid and self._superseded(conn, ident, pending):
            # This node changed the row again since: that change follows in the stream and
            # decides it everywhere. This older state, written now, would take the row back
            # until then (and an application reading it meanwhile would build on it). What it
            # does to other rows still happens, as on every node that writes it: the rows
            # holding its UNIQUE values are displaced.
            if ch.op != ddl.OP_DELETE and local.unique_indexes:
                self.displaced += self._displace_for_skipped(
                    conn, local, cols, vals, key, pending, stream, seq, batch.node_id)
            return SKIPPED
        if ident is not None and pending and not local.content_keyed and ident in pending:
            # A local change to this row is not yet published; it will be published after this
            # message, so it is the row's final state everywhere. Applying this one now would only
            # make the row step back until then. What it does to other rows still happens here
            # as on every node: the rows holding its UNIQUE values are displaced.
            if ch.op != ddl.OP_DELETE and local.unique_indexes:
                self.displaced += self._displace_for_skipped(
                    conn, local, cols, vals, key, pending, stream, seq, batch.node_id)
            return SKIPPED
        if ident is not None and not own:
            pending.touch(ident)
        if ch.op == ddl.OP_DELETE:
            local_key = tuple(values[i] for i in shape.local_key)
            if local.content_keyed and self._removal_absorbed(conn, local, local_key):
                return SKIPPED  # see content_rows: the stream's order leaves the rows as here
            st = self.tables.statements(local, cols, ch.op, statements.raw_mask(local_key))
            statements.run(conn, local, st, cols, vals, local_key)
            if own:
                self._settle(conn, table, local_key, deleted=True)
            return APPLIED
        local_key = tuple(values[i] for i in shape.local_key) if shape.local_key else key
        big = large_values.positions(local, cols, vals)
        if big and self.tables.has_rowid(conn, local) and large_values.apply_change(
                conn, local, ch.op, cols, vals, local_key, big, own, self.tables.statements):
            return APPLIED
        st = self.tables.statements(local, cols, ch.op, statements.raw_mask(vals))
        try:
            # (A node's own changes coming back never conflict with it: one upsert, which
            # writes nothing when the row is already so.)
            if st.insert_new and st.select_row and not own:
                self._insert(conn, local, st, cols, vals, local_key, stream, seq, batch)
            else:
                statements.run(conn, local, st, cols, vals, local_key)
        except sqlite3.IntegrityError as exc:
            # A UNIQUE value another row holds here: the change later in the table's one order
            # wins, the same way on every node (see ``conflicts``).
            if "UNIQUE" not in str(exc):
                raise
            done = conflicts.displace(
                conn, local, cols, vals, local_key, stream=stream, seq=seq,
                origin=batch.node_id, comes_back=self._comes_back(conn, local))
            if not done.removed:
                raise
            self.displaced += done.recorded
            self.provisional.update(done.provisional)
            statements.run(conn, local, st, cols, vals, local_key)
        if own:
            self._settle(conn, table, local_key, deleted=False)
        return APPLIED

    def _superseded(self, conn: sqlite3.Connection, ident: tuple[str, tuple[object, ...]],
                    pending: changelog.PendingKeys) -> bool:
        """Whether this node made a change to the row after its own change being applied
        (``self._cid``), which has not come back yet; forgets the row once its newest change is
        back."""
        cid = self._cid
        newest = pending.newest_own(ident)
        if newest is not None and newest > cid:
            return True
        pending.came_back(ident, cid)
        if cid >= pending.blind_upto:
            pending.blind_done()
            return False
        # Captured before the changes this applier has seen: the log knows (it keeps every
        # change of this start until it is back, see ``own_returns``; a newer change of an
        # earlier start pruned from it while on its way is missed: the row is written as
        # before, and that change, which follows, writes it again).
        return pending.newer_in_log(conn, ident, cid, self.tables.shapes, self.tables.folder(conn))

    def _settle(self, conn: sqlite3.Connection, table: str, key: tuple[object, ...], *,
                deleted: bool) -> None:
        """This node's own change to a row came back: the provisional conflict records of the
        row it decides go (the row is back) or stay for good (it comes back deleted)."""
        if not self.provisional or self._cid <= 0:
            return
        ident = (table, key_text(key))
        if ident not in self.provisional:
            return
        kept, left = conflicts.settle(conn, table, key, self._cid, deleted=deleted)
        self.displaced += kept
        if not left:
            self.provisional.discard(ident)

    def _insert(self, conn: sqlite3.Connection, local: TableInfo, st: statements.Statements,
                cols: tuple[str, ...], vals: tuple[object, ...], key: tuple[object, ...],
                stream: str, seq: int, batch: Batch) -> None:
        """An INSERT: into a free key at once; over a row that differs, record that row as
        displaced (an insert-insert conflict: every node meets it at the same point of the
        stream) and overwrite it."""
        if conn.execute(st.insert_new, vals).rowcount:
            return
        found = fetch_all(conn, st.select_row, key)
        row = found[0] if found else None
        # (A node's own INSERT coming back may meet its own later write: not a conflict.)
        if row is not None and not self.own.made(batch):
            have = dict(zip(local.columns, row, strict=True))
            if any(have.get(c) != v or type(have.get(c)) is not type(v)
                   for c, v in zip(cols, vals, strict=True)):
                if self._own_in_flight(conn, local, key):
                    # This node's own insert of the key is on its way: it comes later in the
                    # stream and wins everywhere, so the row arriving now is the one displaced
                    # (the same loser every node records), and the local row stays.
                    incoming = dict(zip(cols, vals, strict=True))
                    conflicts.record(conn, local, tuple(incoming.get(c) for c in local.columns),
                                     key, stream=stream, seq=seq, origin=self.own.node_id)
                    self.displaced += 1
                    if local.unique_indexes:  # its effect on other rows happens everywhere
                        self.displaced += self._displace_for_skipped(
                            conn, local, cols, vals, key, self.pending, stream, seq,
                            batch.node_id)
                    return
                conflicts.record(conn, local, tuple(row), key, stream=stream, seq=seq,
                                 origin=batch.node_id)
                self.displaced += 1
        statements.run(conn, local, st, cols, vals, key)

    def _displace_for_skipped(self, conn: sqlite3.Connection, local: TableInfo,
                              cols: tuple[str, ...], vals: tuple[object, ...],
                              key: tuple[object, ...], pending: changelog.PendingKeys,
                              stream: str, seq: int, origin: int) -> int:
        """A change not written here (a local change to its row supersedes it) still takes its
        UNIQUE values from the rows holding them, as on the nodes that write it. Rows with a
        local change of their own not sent yet or not back from the stream are spared: that
        change follows in the stream and decides them, and what they hold here is that newer
        state, not the one the other nodes hold at this point of the stream (taking the row
        now would remove, until its change came back, a row the application just wrote)."""
        name, collations = local.name, local.key_collations
        in_flight = self._comes_back(conn, local)
        return conflicts.displace(
            conn, local, cols, vals, key, stream=stream, seq=seq, origin=origin,
            spare=lambda row_key: ((name, fold_key(row_key, collations)) in pending
                                   or in_flight(row_key) is not None)).recorded

    def _own_log(self, local: TableInfo) -> tuple[int, int] | None:
        """The change log's id of ``local`` and how far this node's own changes have come back
        from the stream being applied (None: none of its changes go out, or none to the table).
        """
        if not self.own.origin or not self.skip_pending:  # publish = false: nothing goes out
            return None
        tid = own_changes.table_id(self.tables.shapes, local.name)
        if tid is None:
            return None
        return tid, max(own_changes.back(self.marks, self.own.origins), self.back_floor)

    def _comes_back(self, conn: sqlite3.Connection, local: TableInfo
                    ) -> Callable[[tuple[object, ...]], int | None]:
        """For a row about to be displaced: the id of this node's newest change to it that has
        not come back from the stream yet (None: none). That change follows in the stream and
        decides whether the row is really displaced (see ``conflicts``)."""
        found = None if local.content_keyed else self._own_log(local)
        if found is None:
            return lambda key: None
        tid, back = found
        return lambda key: own_changes.newest(conn, tid, back, key)

    def _removal_absorbed(self, conn: sqlite3.Connection, local: TableInfo,
                          key: tuple[object, ...]) -> bool:
        """A removal from a table without a primary key that this node's own changes in
        flight account for already (see :mod:`content_rows`)."""
        found = self._own_log(local)
        return found is not None and content_rows.removal_absorbed(conn, local, *found, key)

    def _own_in_flight(self, conn: sqlite3.Connection, local: TableInfo,
                       key: tuple[object, ...]) -> bool:
        """Whether this node captured a change to ``key`` that has not come back from the
        stream yet (above its own high-water mark for the stream being applied)."""
        found = self._own_log(local)
        return found is not None and own_changes.in_flight(conn, *found, key)
