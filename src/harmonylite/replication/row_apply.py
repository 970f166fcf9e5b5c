"""One change applied to one row: the table's shape against the sender's, the SQL, what a
change does to the rows around it (UNIQUE displacement, insert-insert conflicts), and when a
local change not yet sent supersedes it. :class:`harmonylite.replication.apply.Applier` adds the
messages, the stream positions and the changes that wait (parked, dead letters).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from harmonylite.cdc import changelog, ddl, schema_changes
from harmonylite.cdc.install import install_in_transaction, report_install
from harmonylite.cdc.schema import TableInfo, fold_key, table_info
from harmonylite.db.connection import fetch_all
from harmonylite.replication import (
    conflicts,
    content_rows,
    large_values,
    own_changes,
    parking,
    statements,
)
from harmonylite.replication.deadletter import key_text
from harmonylite.replication.event import Batch, RowChange
from harmonylite.replication.outcome import (
    APPLIED,
    PARKED,
    SKIPPED,
    UnknownTable,
)
from harmonylite.replication.positions import DeferredPositions
from harmonylite.replication.settle import Settle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangeShape:
    fits: bool  # every column the sender has, this table has
    remote_key: tuple[int, ...]  # positions of the sender's key columns
    local_key: tuple[int, ...]  # positions of this table's key columns (empty: not all sent)
    kept: tuple[int, ...]  # positions of the columns this table has
    kept_cols: tuple[str, ...]


class RowApplier:
    """Holds prepared SQL per table shape; the per-change half of :class:`Applier`."""

    def __init__(self, *, skip_pending: bool = True, origin: str = "",
                 own_origins: dict[str, int | None] | None = None,
                 replicated: Callable[[str], bool] | None = None,
                 unpark_settle: float = 0.0, replicate_ddl: bool = False) -> None:
        self._tables: dict[str, TableInfo | None] = {}
        self._schema_version = -1
        self._sql: dict[tuple[str, tuple[str, ...], int, tuple[bool, ...] | None,
                              tuple[bool, ...] | None], statements.Statements] = {}
        self._rowid: dict[str, bool] = {}  # table -> blob I/O can address its rows
        self._shapes: dict[int, changelog.TableShape] = {}
        self._shapes_seen: dict[tuple[str, tuple[str, ...], tuple[str, ...]], ChangeShape] = {}
        self._pending = changelog.PendingKeys()
        self.deferred = DeferredPositions()  # positions of groups that wrote nothing else
        self.displaced = 0  # rows removed by UNIQUE conflicts (recorded), since start
        self._parked_tables: set[str] = set()
        self.settle = Settle(unpark_settle)
        # With publish = false local changes are never sent, so they must not hide incoming ones.
        self.skip_pending = skip_pending
        # This database's own origin (node id and epoch), and the origins it published under
        # on earlier starts (see ``cdc.origin``): its own changes to a table without a primary
        # key are already here, and applying them again would add a second copy.
        self.origin = origin
        self.own_origins: dict[str, int | None] = dict(own_origins or {})
        if origin:
            self.own_origins[origin] = None
        self.node_id = int(origin.split(":")[0]) if origin else 0
        self._marks: dict[str, int] = {}  # the origins' marks of the stream being applied
        self._cid = 0  # the id of the change being applied in its origin's log (0: unknown)
        self._provisional: set[tuple[str, str]] = set()  # rows with provisional conflicts
        self.replicated = replicated  # tables replicated here (None: all)
        self._ignored: set[str] = set()
        self._replicated_cache: dict[str, bool] = {}  # table -> replicated (patterns cost)
        # Schema changes travel as statements (see ``schema_apply``); capture notes this
        # node's own when the schema moves under the applier.
        self.replicate_ddl = replicate_ddl

    def _refresh(self, conn: sqlite3.Connection) -> bool:
        """When the schema changed (the application's DDL): bring capture up to date in this
        transaction (new and rebuilt tables, before any parked change lands in them) and drop
        cached statements. True when it changed."""
        version = conn.execute("PRAGMA schema_version").fetchone()[0]
        if version == self._schema_version:
            return False
        at_start = self._schema_version == -1
        if not at_start:
            report = install_in_transaction(conn, self.replicated)
            report_install(report, at_start=False)
            if self.replicate_ddl:
                schema_changes.capture(conn, self.node_id, self.replicated)
            version = conn.execute("PRAGMA schema_version").fetchone()[0]
        self._schema_version = version
        # A table or column parked changes wait for may be here (see ``settle``).
        self.settle.schema_changed(at_start=at_start)
        self._tables.clear()
        self._sql.clear()
        self._rowid.clear()
        self._shapes_seen.clear()
        self._shapes = changelog.registry(conn)
        parking.ensure_origin_column(conn)
        conflicts.ensure_provisional_column(conn)
        if at_start:
            self._provisional = conflicts.provisional_keys(conn)
        return True

    def _local(self, conn: sqlite3.Connection, table: str) -> TableInfo | None:
        if table not in self._tables:
            exists = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)
            ).fetchone()
            self._tables[table] = table_info(conn, table) if exists else None
        return self._tables[table]

    def _folder(self, conn: sqlite3.Connection
                ) -> Callable[[str, tuple[object, ...]], tuple[object, ...]]:
        """Keys of local pending changes as their table's collations compare them."""
        def fold(table: str, key: tuple[object, ...]) -> tuple[object, ...]:
            local = self._local(conn, table)
            return fold_key(key, local.key_collations) if local is not None else key
        return fold

    def _shape(self, local: TableInfo | None, remote_cols: tuple[str, ...],
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

    def _statements(self, local: TableInfo, columns: tuple[str, ...], op: int,
                    mask: tuple[bool, ...] | None,
                    zero: tuple[bool, ...] | None = None) -> statements.Statements:
        key = (local.name, columns, op, mask, zero)
        cached = self._sql.get(key)
        if cached is None:
            cached = self._sql[key] = statements.build(local, columns, op, mask, zero)
        return cached

    def _apply_change(
        self,
        conn: sqlite3.Connection,
        stream: str,
        seq: int,
        batch: Batch,
        ch: RowChange,
        pending: changelog.PendingKeys,
        *,
        parked: bool = False,
    ) -> int:
        table = ch.table
        remote_cols = batch.columns[table]
        replicated = self._replicated_cache.get(table)
        if replicated is None:
            replicated = self._replicated_cache[table] = (
                self.replicated is None or self.replicated(table))
        if not replicated:
            if table not in self._ignored:  # each node's own (migration bookkeeping…)
                self._ignored.add(table)
                log.info("changes to table %r are not applied here: it is not replicated "
                         "(exclude_tables / include_tables)", table, extra={"table": table})
            return SKIPPED
        local = self._local(conn, table)
        shape = self._shape(local, remote_cols, batch.keys[table])
        if not parked and (shape is None or not shape.fits or table in self._parked_tables):
            # Not lost: kept in order until this database can take it (a table or a column it
            # lacks; or earlier changes to the table waiting), see ``parking``.
            parking.park(conn, stream, seq, batch, ch)
            self._parked_tables.add(table)
            if shape is not None and (shape.fits or self.replicate_ddl):
                # It may unblock changes parked before it; or (replicated schema changes) it
                # may carry only columns such a change removed here (see ``parking``).
                self.settle.unpark_wanted = True
            return PARKED
        if local is None or shape is None:
            raise UnknownTable(f"no table {table!r} in the local database")
        own = self._own(batch)
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
            st = self._statements(local, cols, ch.op, statements.raw_mask(local_key))
            statements.run(conn, local, st, cols, vals, local_key)
            if own:
                self._settle(conn, table, local_key, deleted=True)
            return APPLIED
        local_key = tuple(values[i] for i in shape.local_key) if shape.local_key else key
        big = large_values.positions(local, cols, vals)
        if big and self._has_rowid(conn, local) and large_values.apply_change(
                conn, local, ch.op, cols, vals, local_key, big, own, self._statements):
            return APPLIED
        st = self._statements(local, cols, ch.op, statements.raw_mask(vals))
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
            self._provisional.update(done.provisional)
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
        # Captured before the changes this applier has seen: the log knows. (A newer change
        # already pruned from it, published and on its way, is missed: the row is written as
        # before, and that change, which follows, writes it again.)
        return pending.newer_in_log(conn, ident, cid, self._shapes, self._folder(conn))

    def _settle(self, conn: sqlite3.Connection, table: str, key: tuple[object, ...], *,
                deleted: bool) -> None:
        """This node's own change to a row came back: the provisional conflict records of the
        row it decides go (the row is back) or stay for good (it comes back deleted)."""
        if not self._provisional or self._cid <= 0:
            return
        ident = (table, key_text(key))
        if ident not in self._provisional:
            return
        kept, left = conflicts.settle(conn, table, key, self._cid, deleted=deleted)
        self.displaced += kept
        if not left:
            self._provisional.discard(ident)

    def _has_rowid(self, conn: sqlite3.Connection, local: TableInfo) -> bool:
        found = self._rowid.get(local.name)
        if found is None:
            found = self._rowid[local.name] = large_values.has_rowid(conn, local)
        return found

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
        if row is not None and not self._own(batch):
            have = dict(zip(local.columns, row, strict=True))
            if any(have.get(c) != v or type(have.get(c)) is not type(v)
                   for c, v in zip(cols, vals, strict=True)):
                if self._own_in_flight(conn, local, key):
                    # This node's own insert of the key is on its way: it comes later in the
                    # stream and wins everywhere, so the row arriving now is the one displaced
                    # (the same loser every node records), and the local row stays.
                    incoming = dict(zip(cols, vals, strict=True))
                    conflicts.record(conn, local, tuple(incoming.get(c) for c in local.columns),
                                     key, stream=stream, seq=seq, origin=self.node_id)
                    self.displaced += 1
                    if local.unique_indexes:  # its effect on other rows happens everywhere
                        self.displaced += self._displace_for_skipped(
                            conn, local, cols, vals, key, self._pending, stream, seq,
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
        UNIQUE values from the rows holding them, as on the nodes that write it; rows with a
        pending local change of their own are spared (that change follows in the stream)."""
        name, collations = local.name, local.key_collations
        done = conflicts.displace(
            conn, local, cols, vals, key, stream=stream, seq=seq, origin=origin,
            spare=lambda row_key: (name, fold_key(row_key, collations)) in pending,
            comes_back=self._comes_back(conn, local))
        self._provisional.update(done.provisional)
        return done.recorded

    def _own(self, batch: Batch) -> bool:
        """Whether ``batch`` holds changes this database made (so they are here already): its
        origin is this database's, and an earlier start's only up to the ids it sent then."""
        if not batch.origin or batch.origin not in self.own_origins:
            return False
        bound = self.own_origins[batch.origin]
        return bound is None or (bool(batch.ids) and max(batch.ids) <= bound)

    def _own_log(self, local: TableInfo) -> tuple[int, int] | None:
        """The change log's id of ``local`` and how far this node's own changes have come back
        from the stream being applied (None: none of its changes go out, or none to the table).
        """
        if not self.origin or not self.skip_pending:  # publish = false: nothing goes out
            return None
        tid = own_changes.table_id(self._shapes, local.name)
        if tid is None:
            return None
        return tid, own_changes.back(self._marks, self.own_origins)

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
