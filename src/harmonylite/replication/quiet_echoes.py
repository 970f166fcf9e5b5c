"""This node's own changes coming back from the stream, when there is nothing to write.

A node applies every message in stream order, its own included (DESIGN rule 1). Its own change
coming back usually finds its row already so: nothing to write. When a whole group of messages is
like that, the applier decides it in a read transaction and writes nothing, not even the stream
position, which waits (see ``positions``): the application, which writes at the same moment,
neither waits for the write lock nor finds its page cache emptied by a commit of the node.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from harmonylite.cdc import changelog
from harmonylite.cdc.schema import fold_key
from harmonylite.errors import DecodeError
from harmonylite.replication.event import Batch, decode
from harmonylite.replication.local_tables import LocalTables
from harmonylite.replication.outcome import ApplyResult
from harmonylite.replication.own_changes import OwnOrigins
from harmonylite.replication.positions import DeferredPositions
from harmonylite.replication.spool import Payload


class QuietEchoes:
    """The read-only path of the applier: its parts are the tables lookup, this database's own
    origins, the rows with local changes not back yet, and the positions kept back. The applier
    asks it only when nothing else waits (parked changes, provisional conflicts, held tables)."""

    def __init__(self, tables: LocalTables, own: OwnOrigins, pending: changelog.PendingKeys,
                 deferred: DeferredPositions) -> None:
        self.tables = tables
        self.own = own
        self.pending = pending
        self.deferred = deferred
        self.marks: dict[str, int] = {}  # the origins' marks after the last group decided

    def apply(self, conn: sqlite3.Connection, stream: str,
              messages: Sequence[tuple[int, Payload]]) -> ApplyResult | None:
        """A group of only this node's own changes coming back, each of them the row's state
        here already (no other node's change written to the row since, see
        ``PendingKeys.touched``) or followed by a newer local change to its row: nothing to
        write but the position, which waits (see ``positions``). Decided in a read
        transaction; None, having written nothing, when the group needs the write path."""
        tables = self.tables
        if not messages or tables.version < 0 or self.deferred.due():
            return None
        batches: list[tuple[int, Batch]] = []
        for seq, data in messages:
            try:
                batch = decode(data)
            except DecodeError:
                return None
            if not batch.ids or batch.schema is not None or not self.own.made(batch):
                return None
            batches.append((seq, batch))
        result = ApplyResult()
        back: list[tuple[tuple[str, tuple[object, ...]], int]] = []
        pending = self.pending
        conn.execute("BEGIN")
        try:
            if conn.execute("PRAGMA schema_version").fetchone()[0] != tables.version:
                return None
            pending.refresh(conn, tables.shapes, tables.folder(conn))
            marks = self.deferred.origin_marks(conn, stream)
            for seq, batch in batches:
                hwm = marks.get(batch.origin, 0)
                for cid, ch in zip(batch.ids, batch.changes, strict=True):
                    if cid <= hwm:
                        result.duplicates += 1
                        continue
                    hwm = cid
                    local = tables.local(conn, ch.table)
                    if (local is None or local.content_keyed or local.unique_indexes
                            or not tables.known_replicated(ch.table)):
                        return None
                    shape = tables.shape(local, batch.columns[ch.table], batch.keys[ch.table])
                    if shape is None or not shape.fits:
                        return None
                    ident = (ch.table, fold_key(tuple(ch.values[i] for i in shape.remote_key),
                                                local.key_collations))
                    newest = pending.newest_own(ident)
                    if newest is None or newest < cid:
                        return None  # not followed here (captured before this start)
                    if newest == cid:
                        if pending.touched(ident):
                            return None
                        back.append((ident, cid))
                    result.skipped_pending += 1
                marks[batch.origin] = hwm
                result.last_seq = seq
                result.messages += 1
                result.origin_nodes.add(batch.node_id)
        finally:
            conn.execute("COMMIT")
        for ident, cid in back:
            pending.came_back(ident, cid)
        self.marks = marks
        self.deferred.note(stream, result.last_seq,
                           {b.origin: marks[b.origin] for _, b in batches})
        return result
