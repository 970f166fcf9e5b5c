"""One message of changes, in the applier's transaction: its changes under one savepoint; when
one fails, the message again change by change, each under its own savepoint, and a change that
fails is written to the dead-letter table with its reason while every other change is applied.
A change whose id is not above its origin's mark is a re-send, and is not applied again.
"""

from __future__ import annotations

import logging
import sqlite3

from harmonylite.db.connection import savepoint
from harmonylite.replication.deadletter import DeadLetters
from harmonylite.replication.event import Batch
from harmonylite.replication.outcome import (
    APPLIED,
    DEAD,
    DUPLICATE,
    PARKED,
    SKIPPED,
    ApplyResult,
    is_transient,
)
from harmonylite.replication.parking import ParkedChanges
from harmonylite.replication.row_apply import RowApplier

log = logging.getLogger(__name__)


class MessageApplier:
    """Applies one message of changes with the row applier; its parts: the row applier, the
    dead letters, and the parked changes (named when the message parks some)."""

    def __init__(self, rows: RowApplier, dead: DeadLetters, parked: ParkedChanges) -> None:
        self.rows = rows
        self.dead = dead
        self.parked = parked

    def apply(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
              marks: dict[str, int], result: ApplyResult) -> None:
        """The changes of ``batch`` under a savepoint, counted in ``result``; when a change
        fails, again change by change. ``marks``: the origins' marks of ``stream``, raised
        past the changes applied. Raises only transient errors."""
        try:
            with savepoint(conn, "msg"):
                outcomes = self._changes(conn, stream, seq, batch, dict(marks), isolate=False)
        except Exception as exc:
            if is_transient(exc):
                raise
            # Rolled back: again change by change, each under its own savepoint.
            with savepoint(conn, "msg"):
                outcomes = self._changes(conn, stream, seq, batch, marks, isolate=True)
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
            tables = sorted({c.table for c in batch.changes if c.table in self.parked.tables})
            log.warning("%s sequence %d: %d changes to %s parked: this database cannot take "
                        "them yet (a table or a column it lacks, or earlier changes to the "
                        "table waiting); they are applied once it can", stream, seq,
                        outcomes[PARKED], ", ".join(map(repr, tables)),
                        extra={"stream": stream, "sequence": seq})

    def _changes(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch,
                 marks: dict[str, int], *, isolate: bool) -> list[int]:
        """Outcome counts (indexed by ``outcome.APPLIED`` …); ``isolate``: each change under
        a savepoint of its own, one that fails dead-lettered."""
        outcomes = [0, 0, 0, 0, 0]
        origin = batch.origin if batch.ids else ""
        hwm = marks.get(origin, 0) if origin else 0
        for i, ch in enumerate(batch.changes):
            cid = 0
            if origin:
                cid = batch.ids[i]
                if cid <= hwm:
                    outcomes[DUPLICATE] += 1
                    continue
                hwm = cid
            if not isolate:
                outcomes[self.rows.apply(conn, stream, seq, batch, ch, cid=cid)] += 1
                continue
            try:
                with savepoint(conn, "ch"):
                    outcome = self.rows.apply(conn, stream, seq, batch, ch, cid=cid)
            except Exception as exc:
                if is_transient(exc):
                    raise
                self.dead.change(conn, stream, seq, batch, i, exc)
                outcome = DEAD
            outcomes[outcome] += 1
        if origin:
            marks[origin] = hwm
        return outcomes
