"""Applying change batches to the local database (runs on the writer's thread).

One transaction per group of messages: the changes, then the stream position in
``__harmonylite__seq``; so a crash re-applies at most an uncommitted suffix, which is harmless
because changes carry whole rows (DESIGN rule 2).

Errors are of two kinds (DESIGN rule 14). A transient one (the database busy or locked beyond the
timeout, disk full, I/O) rolls the whole transaction back and is raised: the caller retries the
same messages later, so nothing is skipped. Any other error concerns one change: the message is
applied again change by change, each under its own savepoint, and a change that fails is written
to the dead-letter table with its reason while every other change (other rows, other
transactions batched with it) is applied. A message that is not a change batch at all is
dead-lettered whole.

Changes to a table this database does not have are parked in ``__harmonylite__parked``, in
arrival order, and applied once the table exists (``retry_parked``). A change whose origin
database already had a later change applied from this stream is a re-send and is ignored
(``__harmonylite__origins``).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable, Sequence

from harmonylite.cdc import changelog, ddl, schema_changes
from harmonylite.cdc.install import install_in_transaction, report_install
from harmonylite.db.connection import write_transaction
from harmonylite.errors import DecodeError
from harmonylite.replication import conflicts, dead_retry, parking
from harmonylite.replication.dead_retry import DeadRetry
from harmonylite.replication.deadletter import DeadLetters
from harmonylite.replication.event import Batch, decode
from harmonylite.replication.local_tables import NEVER_READ, LocalTables
from harmonylite.replication.message_apply import MessageApplier
from harmonylite.replication.outcome import ApplyResult
from harmonylite.replication.own_changes import OwnOrigins, back
from harmonylite.replication.own_returns import OwnReturns
from harmonylite.replication.parking import ParkedChanges
from harmonylite.replication.positions import DeferredPositions, Kept
from harmonylite.replication.quiet_echoes import QuietEchoes
from harmonylite.replication.row_apply import RowApplier
from harmonylite.replication.schema_apply import SchemaMessages
from harmonylite.replication.settle import Settle
from harmonylite.replication.spool import Payload, as_bytes

log = logging.getLogger(__name__)


class Applier:
    """Applies groups of messages in order with their stream positions, each group in one write
    transaction with the guard flag set (``changelog.replicating``), and decides when parked
    changes and dead letters are tried again. Holds its parts: the tables lookup, one change
    (``row_apply``), one message (``message_apply``; a schema change: ``schema_apply``), the
    read-only path for its own changes coming back (``quiet_echoes``), the parked changes, the
    dead letters and their retry, and the positions kept back. One instance per writer
    connection."""

    def __init__(self, *, skip_pending: bool = True, origin: str = "",
                 own_origins: dict[str, int | None] | None = None,
                 replicated: Callable[[str], bool] | None = None,
                 unpark_settle: float = 0.0, replicate_ddl: bool = False,
                 returns: OwnReturns | None = None) -> None:
        # With publish = false local changes are never sent, so they must not hide incoming ones.
        self.skip_pending = skip_pending
        # Schema changes travel as statements (see ``schema_apply``); capture notes this
        # node's own when the schema moves under the applier.
        self.replicate_ddl = replicate_ddl
        self.replicated = replicated  # tables replicated here (None: all)
        self.own = OwnOrigins(origin, own_origins)
        self.settle = Settle(unpark_settle)
        self.deferred = DeferredPositions()  # positions of groups that wrote nothing else
        self.tables = LocalTables(replicated)
        self.parked = ParkedChanges(self.settle, replicate_ddl=replicate_ddl)
        self.dead = DeadLetters()
        self.dead_retry = DeadRetry(self.settle)
        self._pending = changelog.PendingKeys()
        self.rows = RowApplier(self.tables, self.own, self._pending, self.parked,
                               skip_pending=skip_pending)
        self.echoes = QuietEchoes(self.tables, self.own, self._pending, self.deferred)
        self.messages = MessageApplier(self.rows, self.dead, self.parked)
        self.schema = SchemaMessages(self.own, replicated, replicate_ddl=replicate_ddl)
        self._cut: dict[str, int] = {}
        self._cut_floor = 0
        # Notes how far this node's own changes came back (the change log keeps the rest).
        self.returns = returns or OwnReturns()

    def after_cut(self, cut: dict[str, int], floor: int) -> None:
        """The last shard-count change: each old stream's last sequence before it (``cut``),
        and the highest id this node published under the old count (``floor``). A row's
        changes may then sit on an old stream and on a new one: past its stream's cut, which
        is applied only once every old stream reached its own, an own change up to ``floor``
        came back on its old stream, whatever the marks of the stream being applied say."""
        self._cut, self._cut_floor = cut, floor

    @property
    def displaced(self) -> int:
        """Rows removed by UNIQUE conflicts (recorded), since start."""
        return self.rows.displaced

    def unpark_wait(self) -> float | None:
        """Seconds until deferred work (parked changes, dead letters a schema change may let
        in) is due (0: now), None when none waits."""
        return self.parked.next_due()

    def held_tables(self) -> set[str]:
        """Tables whose republished rows the publisher must not read yet (see ``settle``)."""
        return self.settle.held_tables()

    def _refresh(self, conn: sqlite3.Connection) -> bool:
        """When the schema changed (the application's DDL): bring capture up to date in this
        transaction (new and rebuilt tables, before any parked change lands in them) and drop
        cached statements. True when it changed."""
        if not self.tables.moved(conn):
            return False
        at_start = self.tables.version == NEVER_READ
        if not at_start:
            report = install_in_transaction(conn, self.replicated)
            report_install(report, at_start=False)
            if self.replicate_ddl:
                schema_changes.capture(conn, self.own.node_id, self.replicated)
        self.tables.reload(conn)
        # A table or column parked changes wait for may be here (see ``settle``).
        self.settle.schema_changed(at_start=at_start)
        parking.ensure_origin_column(conn)
        conflicts.ensure_provisional_column(conn)
        if at_start:
            self.rows.load_provisional(conn)
        return True

    def _unpark(self, conn: sqlite3.Connection) -> int:
        """Apply, in arrival order, the parked changes that fit this database now."""
        return self.parked.unpark(
            conn, lambda table: self.tables.columns(conn, table),
            lambda item: self.rows.apply(conn, item.stream, item.seq, item.batch(),
                                         item.change(), parked=True))

    def retry_dead_letters(self, conn: sqlite3.Connection) -> int:
        """After a schema change: apply again the dead letters a stricter schema refused (a NOT
        NULL column the sender did not have), when their row is still absent here — a row
        written since supersedes them (they stay for the operator). Returns how many applied."""
        letters = self.dead_retry.due_letters(conn)
        if not letters:
            return 0
        with write_transaction(conn):
            self._refresh(conn)
            with changelog.replicating(conn):
                applied = dead_retry.retry(
                    conn, letters, lambda table: self.tables.local(conn, table),
                    lambda stream, seq, batch, ch: self.rows.apply(
                        conn, stream, seq, batch, ch, parked=True))
        if applied:
            log.info("applied %d dead letters that the schema now accepts", applied)
        return applied

    def retry_parked(self, conn: sqlite3.Connection) -> int:
        """Apply parked changes whose table appeared since the last look (a cheap no-op when
        the schema did not change)."""
        applied = 0
        kept = self.deferred.take()
        try:
            with write_transaction(conn):
                kept.write(conn)
                applied = self._retry_parked(conn)
        except BaseException:
            self.deferred.restore(kept)
            raise
        self.parked.transaction_committed()
        return applied

    def _retry_parked(self, conn: sqlite3.Connection) -> int:
        applied = 0
        if self._refresh(conn):
            self.parked.reload(conn)
        self.parked.transaction_started()
        if self.parked.due():
            with changelog.replicating(conn):
                self._pending.refresh(conn, self.tables.shapes, self.tables.folder(conn))
                applied = self._unpark(conn)
        return applied

    def flush_positions(self, conn: sqlite3.Connection) -> None:
        """Write the positions kept back (see ``positions``); at the node's stop."""
        if not self.deferred:
            return
        kept = self.deferred.take()
        try:
            with write_transaction(conn):
                kept.write(conn)
        except BaseException:
            self.deferred.restore(kept)
            raise

    def apply(
        self, conn: sqlite3.Connection, stream: str, messages: Sequence[tuple[int, Payload]],
        *, replay: bool = False,
    ) -> ApplyResult:
        """Apply messages (sequence, payload) in order and record the stream position.

        Raises only transient errors (see :func:`is_transient`), after rolling everything back.
        ``replay`` applies kept changes again (a dead letter's retry): no duplicate check, and
        neither the stream position nor the origins' marks move.
        """
        if not replay and self._only_echoes_may_wait():
            quiet = self.echoes.apply(conn, stream, messages)
            if quiet is not None:
                self._came_back(stream, self.echoes.marks, quiet.last_seq)
                return quiet
        kept = self.deferred.take()
        try:
            result = self._apply(conn, stream, messages, replay, kept)
        except BaseException:
            self.deferred.restore(kept)
            raise
        if not replay:
            self._came_back(stream, self.rows.marks, result.last_seq)
        return result

    def _came_back(self, stream: str, marks: dict[str, int], seq: int) -> None:
        """Note how far this node's own changes came back from ``stream`` (once committed):
        the origins' ``marks`` after the group, whose last message was ``seq``."""
        self.returns.came_back(stream, back(marks, self.own.origins))
        if self._cut and seq > self._cut.get(stream, 0):
            self.returns.back_everywhere(self._cut_floor)  # see ``after_cut``

    def _only_echoes_may_wait(self) -> bool:
        """Whether nothing but the group itself needs a write (see ``quiet_echoes``): no
        parked changes or dead letters waiting, no provisional conflicts, no table held."""
        return (self.skip_pending and not self.parked and not self.rows.provisional
                and not self.settle.held_tables() and self.parked.next_due() is None)

    def _apply(self, conn: sqlite3.Connection, stream: str,
               messages: Sequence[tuple[int, Payload]], replay: bool, kept: Kept
               ) -> ApplyResult:
        result = ApplyResult()
        with write_transaction(conn):
            kept.write(conn)
            self._refresh(conn)
            with changelog.replicating(conn):
                self._apply_guarded(conn, stream, messages, replay, result)
        self.parked.transaction_committed()
        return result

    def _apply_guarded(self, conn: sqlite3.Connection, stream: str,
                       messages: Sequence[tuple[int, Payload]], replay: bool,
                       result: ApplyResult) -> None:
        """The messages, the origins' marks and the stream position, as the replicator's own
        writes (the guard flag set)."""
        if self.skip_pending:
            self._pending.refresh(conn, self.tables.shapes, self.tables.folder(conn))
        self.parked.reload(conn)
        self.parked.transaction_started()
        if self.parked.due():
            result.unparked = self._unpark(conn)
        marks = self.rows.marks = self.deferred.origin_marks(conn, stream)
        moved: set[str] = set()
        for seq, data in messages:
            result.last_seq = seq
            result.messages += 1
            try:
                batch = decode(data)
            except DecodeError as exc:
                reason = self.dead.message(conn, stream, seq, as_bytes(data), exc,
                                           lambda t: self.tables.local_pk(conn, t))
                result.failed.append((seq, reason))
                result.dead_letters += 1
                continue
            result.origin_nodes.add(batch.node_id)
            if replay:
                batch = Batch(batch.node_id, batch.columns, batch.keys, batch.changes,
                              schema=batch.schema)
            self.rows.back_floor = (self._cut_floor if self._cut and seq > self._cut.get(stream, 0)
                                    else 0)
            try:
                self._apply_message(conn, stream, seq, batch, marks, result)
            finally:
                self.rows.back_floor = 0
            if batch.origin and batch.ids:
                moved.add(batch.origin)
        conn.executemany(
            f"INSERT INTO {ddl.ORIGINS}(origin, stream, hwm) VALUES (?, ?, ?) "
            "ON CONFLICT(origin, stream) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
            [(o, stream, marks[o]) for o in moved])
        if self.parked.due():
            result.unparked += self._unpark(conn)
        if result.last_seq and not replay:
            conn.execute(
                f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?) ON CONFLICT(stream) "
                "DO UPDATE SET seq = max(seq, excluded.seq)",
                (stream, result.last_seq),
            )

    def _apply_message(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
                       marks: dict[str, int], result: ApplyResult) -> None:
        if batch.schema is None:
            self.messages.apply(conn, stream, seq, batch, marks, result)
        elif self.schema.apply(conn, stream, seq, batch):
            self.tables.forget()  # caches and statements follow the new schema
            self._refresh(conn)
