"""Reading pending changes in batches that end at a commit: no transaction is ever cut.

SQLite has one writer, so the change-log rows of one committed transaction are contiguous in id
order, and a read transaction sees whole commits only. A batch is therefore everything pending
when its read transaction starts: it ends at the newest change-log row that transaction sees, a
commit boundary. The rows are read in that same read transaction (DESIGN rule 17 reads each row as
it is now; read in one view, the rows sent are exactly the origin's state at that commit, so a
receiver that applies the whole batch at once never shows part of a transaction).

A batch of any size is read in chunks of ``scan_max_changes`` inside that one read transaction,
so memory stays bounded for a bulk load: each chunk is encoded and published before the next is
read, and the read transaction stays open meanwhile (it never takes the write lock, so the
application keeps committing; the WAL only cannot be reset until it ends). The publisher marks
every message of a batch but its shard's last with "more follows" and receivers apply a batch's
messages together.

The end of the batch is recorded (the intent) before its first message goes out, on another
connection than the one holding the read transaction. A node that stopped mid-batch sends it
again from the watermark, cut the same way up to the recorded end (so the message ids repeat and
JetStream drops copies it already stored), and on to everything pending now.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.rows import RowReader
from harmonylite.db.connection import write_transaction


@dataclass
class Chunk:
    """The changes of log rows up to ``upto`` (in the open batch), and their tables' shapes."""

    upto: int
    changes: list[Change]
    shapes: dict[str, TableShape]
    entries: int  # change-log rows it covers (several changes to a row collapse into one)
    final: bool  # the last chunk of its batch


class BatchReader:
    """Cuts the change log into batches that end at commits; runs on the publisher's thread.

    ``next_chunk`` and ``finish`` take ``conn``, a connection of its own that holds a batch's
    read transaction (so other reads on the thread see the database as it is), and ``writes``,
    the one that records intents and watermarks.
    """

    def __init__(self, limit: int, held: Callable[[], set[str]] | None = None,
                 epoch: str = "") -> None:
        self.limit = limit
        self._held = held
        self.epoch = epoch  # this start's epoch
        self.batch_epoch = epoch  # the open batch's: a batch begun before a stop keeps its own
        self._registry: dict[int, TableShape] = {}
        self._rows = RowReader()
        self.end = 0  # last change id of the open batch (0: none open)
        self._pos = 0  # last change id read so far
        self._cut = 0  # a chunk ends here too: the end recorded by a batch begun before a stop

    def _open(self, conn: sqlite3.Connection, writes: sqlite3.Connection,
              published: int | None) -> bool:
        """Begin the next batch's read transaction; record its end (and ``published``, the end
        of the batch just sent) in one short write. False when nothing is pending."""
        # Asked before the read transaction starts: a hold ends only once the changes it waits
        # for are committed, so a read that starts after it ends sees them.
        held = self._held() if self._held is not None else None
        if not self._registry:
            self._registry.update(changelog.registry(conn))
        conn.execute("BEGIN")
        try:
            wm = changelog.watermark(conn) if published is None else published
            intent = changelog.intent(conn)
            end = int(conn.execute(f"SELECT max(id) FROM {ddl.LOG}").fetchone()[0] or 0)
            if held:
                end = min(end, self._before_held(conn, wm, held))
            cut = intent if intent > wm else 0
            if cut:
                # A batch begun before a stop goes out again exactly, under the epoch it first
                # went out under: same message ids, so JetStream drops the copies it stored.
                end, epoch = cut, changelog.intent_epoch(conn) or self.epoch
            else:
                epoch = self.epoch
            if end <= wm:
                conn.execute("COMMIT")
                if published is not None:
                    with write_transaction(writes):
                        changelog.mark_published(writes, published)
                return False
            with write_transaction(writes):
                if published is not None:
                    changelog.mark_published(writes, published)
                changelog.set_intent(writes, end, epoch)
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        self.end, self._pos, self._cut, self.batch_epoch = end, wm, cut, epoch
        return True

    def _before_held(self, conn: sqlite3.Connection, after: int, held: set[str]) -> int:
        """The batch stops before the first republished row of a held table (log order is
        kept): read now, it would lack the changes parked for its table and overwrite them
        everywhere; it goes once they are applied (see ``Applier.held_tables``)."""
        names = sorted(held)
        marks = ", ".join("?" * len(names))
        row = conn.execute(
            f"SELECT min(l.id) FROM {ddl.LOG} l JOIN {ddl.TABLES} t ON t.tid = l.tid "
            f"WHERE l.id > ? AND l.op = ? AND t.name IN ({marks})",
            (after, ddl.OP_BACKFILL, *names)).fetchone()
        return int(row[0]) - 1 if row and row[0] is not None else 2**62

    def _read(self, conn: sqlite3.Connection) -> Chunk:
        try:
            stop = self._cut if self._pos < self._cut else self.end
            entries = changelog.read_entries(conn, self._pos, self.limit, self._registry, stop)
            upto = entries[-1].id if len(entries) == self.limit else stop
            changes, shapes = self._rows.changes(conn, entries, self._registry)
            self._pos = upto
            final = upto >= self.end
            if final:
                conn.execute("COMMIT")  # everything is read: the view is no longer needed
        except BaseException:
            self.abandon(conn)
            raise
        return Chunk(upto, changes, shapes, len(entries), final)

    def next_chunk(self, conn: sqlite3.Connection, writes: sqlite3.Connection) -> Chunk | None:
        """The next chunk of the open batch; begins a batch when none is open (None: nothing
        pending)."""
        if not self.end and not self._open(conn, writes, None):
            return None
        return self._read(conn)

    def finish(self, conn: sqlite3.Connection, writes: sqlite3.Connection) -> Chunk | None:
        """The open batch is acknowledged: mark it published and begin the next one in the same
        write (one short write transaction per batch under a steady stream of commits)."""
        if not self._open(conn, writes, self.end):  # on an error the batch stays to finish
            self.end = 0
            return None
        return self._read(conn)

    def abandon(self, conn: sqlite3.Connection) -> None:
        """Give up the open batch (its sending failed): end the read transaction, so an outage
        never keeps it open; the next batch begins at the watermark and, cut the same way up to
        the recorded end, repeats the same message ids."""
        self.end = 0
        if conn.in_transaction:
            conn.execute("ROLLBACK")
