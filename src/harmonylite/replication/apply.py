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
from collections.abc import Sequence

from harmonylite.cdc import changelog, ddl, schema_changes
from harmonylite.cdc.install import install_in_transaction, report_install
from harmonylite.db.connection import savepoint, write_transaction
from harmonylite.errors import DecodeError
from harmonylite.replication import dead_retry, deadletter, parking, schema_apply
from harmonylite.replication.event import Batch, decode
from harmonylite.replication.outcome import (
    APPLIED,
    DEAD,
    DUPLICATE,
    PARKED,
    SKIPPED,
    ApplyResult,
    is_transient,
)
from harmonylite.replication.positions import Kept
from harmonylite.replication.quiet_echoes import QuietEchoes
from harmonylite.replication.spool import Payload, as_bytes

log = logging.getLogger(__name__)


class Applier(QuietEchoes):
    """Applies messages in order with their stream positions; holds the changes that wait
    (parked, refused dead letters). One instance per writer connection."""

    _schema_ignored = False  # a schema change arrived while replicate_ddl is false (logged)

    def unpark_wait(self) -> float | None:
        """Seconds until deferred work (parked changes, dead letters a schema change may let
        in) is due (0: now), None when none waits."""
        return self.settle.next_due(self._parked_tables)

    def held_tables(self) -> set[str]:
        """Tables whose republished rows the publisher must not read yet (see ``settle``)."""
        return self.settle.held_tables()

    def _unpark(self, conn: sqlite3.Connection, pending: changelog.PendingKeys) -> int:
        """Apply, in arrival order, the parked changes that fit this database now."""
        self.settle.unparking()

        def columns_of(table: str) -> set[str] | None:
            local = self._local(conn, table)
            return set(local.columns) if local is not None else None

        def apply_one(item: parking.Parked, subset: bool) -> bool:
            try:
                with savepoint(conn, "parked"):
                    self._apply_change(conn, item.stream, item.seq, item.batch(), item.change(),
                                       pending, parked=True)
            except Exception as exc:
                if is_transient(exc):
                    raise
                log.error("parked change from %s sequence %d to table %r cannot be applied; it "
                          "and the later changes to that table stay parked: %s", item.stream,
                          item.seq, item.table, exc, extra={"table": item.table})
                return False
            return True

        def gone(table: str) -> set[str]:
            return schema_changes.removed_columns(conn, table)

        applied = parking.release(conn, columns_of, apply_one,
                                  gone if self.replicate_ddl else None)
        self._parked_tables = parking.parked_tables(conn)
        if applied:
            log.info("applied %d parked changes now that this database can take them", applied)
        return applied

    def _local_pk(self, conn: sqlite3.Connection, table: str) -> tuple[str, ...] | None:
        local = self._local(conn, table)
        return tuple(local.pk) if local is not None and not local.content_keyed else None

    def retry_dead_letters(self, conn: sqlite3.Connection) -> int:
        """After a schema change: apply again the dead letters a stricter schema refused (a NOT
        NULL column the sender did not have), when their row is still absent here — a row
        written since supersedes them (they stay for the operator). Returns how many applied."""
        if self.settle.wait() > 0:
            self.settle.dead_retry_wanted = True  # once the schema has settled
            return 0
        self.settle.dead_retry_wanted = False
        letters = dead_retry.waiting(conn)
        if not letters:
            return 0
        with write_transaction(conn):
            self._refresh(conn)
            with changelog.replicating(conn):
                applied = dead_retry.retry(
                    conn, letters, lambda table: self._local(conn, table),
                    lambda stream, seq, batch, ch: self._apply_change(
                        conn, stream, seq, batch, ch, self._pending, parked=True))
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
        self.settle.transaction_committed(self._parked_tables)
        return applied

    def _retry_parked(self, conn: sqlite3.Connection) -> int:
        applied = 0
        if self._refresh(conn):
            self._parked_tables = parking.parked_tables(conn)
        self.settle.transaction_started(self._parked_tables)
        if self.settle.due(self._parked_tables):
            with changelog.replicating(conn):
                self._pending.refresh(conn, self._shapes, self._folder(conn))
                applied = self._unpark(conn, self._pending)
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
        if not replay:
            quiet = self._quiet_echoes(conn, stream, messages)
            if quiet is not None:
                return quiet
        kept = self.deferred.take()
        try:
            return self._apply(conn, stream, messages, replay, kept)
        except BaseException:
            self.deferred.restore(kept)
            raise

    def _apply(self, conn: sqlite3.Connection, stream: str,
               messages: Sequence[tuple[int, Payload]], replay: bool, kept: Kept
               ) -> ApplyResult:
        result = ApplyResult()
        with write_transaction(conn):
            kept.write(conn)
            self._refresh(conn)
            with changelog.replicating(conn):
                self._apply_guarded(conn, stream, messages, replay, result)
        self.settle.transaction_committed(self._parked_tables)
        return result

    def _apply_guarded(self, conn: sqlite3.Connection, stream: str,
                       messages: Sequence[tuple[int, Payload]], replay: bool,
                       result: ApplyResult) -> None:
        """The messages, the origins' marks and the stream position, as the replicator's own
        writes (the guard flag set)."""
        if self.skip_pending:
            self._pending.refresh(conn, self._shapes, self._folder(conn))
        pending = self._pending
        self._parked_tables = parking.parked_tables(conn)
        self.settle.transaction_started(self._parked_tables)
        if self.settle.due(self._parked_tables):
            result.unparked = self._unpark(conn, pending)
        marks = self._marks = self._read_marks(conn, stream)
        moved: set[str] = set()
        for seq, data in messages:
            result.last_seq = seq
            result.messages += 1
            try:
                batch = decode(data)
            except DecodeError as exc:
                raw = as_bytes(data)
                about = deadletter.about_message(raw, lambda t: self._local_pk(conn, t))
                deadletter.record_message(conn, stream, seq, raw, str(exc), about)
                result.failed.append((seq, f"{exc} (node {about.origin}, table "
                                           f"{about.table}, key {about.key})"))
                result.dead_letters += 1
                continue
            result.origin_nodes.add(batch.node_id)
            if replay:
                batch = Batch(batch.node_id, batch.columns, batch.keys, batch.changes,
                              schema=batch.schema)
            self._apply_message(conn, stream, seq, batch, pending, marks, result)
            if batch.origin and batch.ids:
                moved.add(batch.origin)
        conn.executemany(
            f"INSERT INTO {ddl.ORIGINS}(origin, stream, hwm) VALUES (?, ?, ?) "
            "ON CONFLICT(origin, stream) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
            [(o, stream, marks[o]) for o in moved])
        if self.settle.due(self._parked_tables):
            result.unparked += self._unpark(conn, pending)
        if result.last_seq and not replay:
            conn.execute(
                f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?) ON CONFLICT(stream) "
                "DO UPDATE SET seq = max(seq, excluded.seq)",
                (stream, result.last_seq),
            )

    def _apply_message(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
                       pending: changelog.PendingKeys, marks: dict[str, int],
                       result: ApplyResult) -> None:
        """One message under a savepoint; when a change fails, again change by change."""
        if batch.schema is not None:
            self._apply_schema(conn, stream, seq, batch)
            return
        try:
            with savepoint(conn, "msg"):
                outcomes = self._apply_changes(conn, stream, seq, batch, pending, dict(marks),
                                               isolate=False)
        except Exception as exc:
            if is_transient(exc):
                raise
            # Rolled back: again change by change, each under its own savepoint.
            with savepoint(conn, "msg"):
                outcomes = self._apply_changes(conn, stream, seq, batch, pending, marks,
                                               isolate=True)
        else:
            if batch.origin and batch.ids:
                marks[batch.origin] = max(marks.get(batch.origin, 0), max(batch.ids))
        result.rows += outcomes[APPLIED]
        result.skipped_pending += outcomes[SKIPPED]
        result.parked += outcomes[PARKED]
        result.duplicates += outcomes[DUPLICATE]
        result.dead_letters += outcomes[DEAD]
        if outcomes[DEAD]:
            result.failed.append((seq, f"{outcomes[DEAD]} changes dead-lettered"))
        if outcomes[PARKED]:
            tables = sorted({c.table for c in batch.changes if c.table in self._parked_tables})
            log.warning("%s sequence %d: %d changes to %s parked: this database cannot take "
                        "them yet (a table or a column it lacks, or earlier changes to the "
                        "table waiting); they are applied once it can", stream, seq,
                        outcomes[PARKED], ", ".join(map(repr, tables)),
                        extra={"stream": stream, "sequence": seq})

    def _apply_schema(self, conn: sqlite3.Connection, stream: str, seq: int,
                      batch: Batch) -> None:
        """A schema change (``replicate_ddl``); see ``schema_apply``."""
        if not self.replicate_ddl:
            if not self._schema_ignored:
                self._schema_ignored = True
                log.warning("%s sequence %d: a schema change from node %d is not applied: "
                            "replicate_ddl is false on this node (every node must share the "
                            "setting)", stream, seq, batch.node_id,
                            extra={"stream": stream, "sequence": seq})
            return
        try:
            with savepoint(conn, "schema_msg"):
                outcome = schema_apply.apply(conn, stream, seq, batch, self.node_id,
                                             self.replicated)
        except Exception as exc:
            if is_transient(exc):
                raise
            # Not a schema change this node can read (a malformed message): recorded, and
            # the stream goes on; the changes to its tables wait parked.
            uid = str((batch.schema or {}).get("u", f"{stream}:{seq}"))
            reason = f"{type(exc).__name__}: {exc}"
            schema_changes.ensure(conn)
            schema_changes.record(conn, uid, batch.node_id, "failed", {}, [], reason)
            log.error("%s sequence %d: schema change %s of node %d cannot be applied: %s",
                      stream, seq, uid, batch.node_id, reason,
                      extra={"stream": stream, "sequence": seq, "schema_change": uid})
            return
        if not outcome.changed:
            return
        report = install_in_transaction(conn, self.replicated, backfill=False)
        report_install(report, at_start=False)
        for table in outcome.republish:
            schema_changes.republish(conn, table)
        if self.origin and not outcome.republish:
            # This node's own changes to these tables that were sent under the old schema and
            # are not back yet: sent again under the new one.
            back = self._own_back(conn)
            for table in outcome.tables:
                schema_changes.republish_in_flight(conn, table, back)
        schema_changes.remember(conn, schema_changes.current(conn, self.replicated))
        self._schema_version = -2  # caches and statements follow the new schema
        self._refresh(conn)

    def _own_back(self, conn: sqlite3.Connection) -> int:
        """How far this node's own changes have come back from every stream (the lowest of
        its origins' marks over the streams; 0 when one has none)."""
        own = sorted(self.own_origins)
        if not own:
            return 0
        marks = [int(m) for (m,) in conn.execute(
            f"SELECT max(hwm) FROM {ddl.ORIGINS} WHERE origin IN "
            f"({', '.join('?' for _ in own)}) GROUP BY stream", own)]
        return min(marks) if marks else 0

    def _apply_changes(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
                       pending: changelog.PendingKeys, marks: dict[str, int], *,
                       isolate: bool) -> list[int]:
        outcomes = [0, 0, 0, 0, 0]
        origin = batch.origin if batch.ids else ""
        hwm = marks.get(origin, 0) if origin else 0
        for i, ch in enumerate(batch.changes):
            self._cid = 0
            if origin:
                cid = self._cid = batch.ids[i]
                if cid <= hwm:
                    outcomes[DUPLICATE] += 1
                    continue
                hwm = cid
            if not isolate:
                outcomes[self._apply_change(conn, stream, seq, batch, ch, pending)] += 1
                continue
            try:
                with savepoint(conn, "ch"):
                    outcome = self._apply_change(conn, stream, seq, batch, ch, pending)
            except Exception as exc:
                if is_transient(exc):
                    raise
                reason = f"{type(exc).__name__}: {exc}"
                deadletter.record_change(conn, stream, seq, batch, i, reason)
                log.error("change to table %r from node %d (%s sequence %d) cannot be applied "
                          "and was put in the dead-letter table: %s", ch.table, batch.node_id,
                          stream, seq, reason,
                          extra={"stream": stream, "sequence": seq, "table": ch.table})
                outcome = DEAD
            outcomes[outcome] += 1
        self._cid = 0
        if origin:
            marks[origin] = hwm
        return outcomes
