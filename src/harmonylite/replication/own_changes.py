"""This node's own changes still on their way: captured here, not yet back from the stream.

Change ids grow across this database's starts, so the highest mark any of its own origins has
on the stream being applied is how far its own changes have come back; a change in the log
above it is still in flight (it follows in the stream and decides its row everywhere).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping

from harmonylite.cdc import changelog, ddl
from harmonylite.replication.event import Batch


class OwnOrigins:
    """This database's own origin (node id and epoch), and the origins it published under on
    earlier starts (see ``cdc.origin``), each with the highest change id it sent then (None: no
    bound, this start's): changes of these are already here."""

    def __init__(self, origin: str = "", earlier: dict[str, int | None] | None = None) -> None:
        self.origin = origin
        self.origins: dict[str, int | None] = dict(earlier or {})
        if origin:
            self.origins[origin] = None
        self.node_id = int(origin.split(":")[0]) if origin else 0

    def made(self, batch: Batch) -> bool:
        """Whether ``batch`` holds changes this database made (so they are here already): its
        origin is this database's, and an earlier start's only up to the ids it sent then."""
        if not batch.origin or batch.origin not in self.origins:
            return False
        bound = self.origins[batch.origin]
        return bound is None or (bool(batch.ids) and max(batch.ids) <= bound)


def table_id(shapes: Mapping[int, changelog.TableShape], table: str) -> int | None:
    """The change log's id of ``table`` (None: it captured nothing for it)."""
    return next((t for t, shape in shapes.items() if shape.name == table), None)


def back(marks: Mapping[str, int], own_origins: Iterable[str]) -> int:
    """How far this node's own changes have come back from the stream being applied."""
    return max((marks.get(o, 0) for o in own_origins), default=0)


def newest(conn: sqlite3.Connection, tid: int, back: int, key: tuple[object, ...]) -> int | None:
    """The id of this node's newest change to the row ``key`` still in flight (None: none)."""
    where = " AND ".join(f"k{i} IS ?" for i in range(len(key)))
    row = conn.execute(f"SELECT max(id) FROM {ddl.LOG} WHERE tid = ? AND id > ? AND "
                       f"{where}", (tid, back, *key)).fetchone()
    return int(row[0]) if row and row[0] is not None else None


def in_flight(conn: sqlite3.Connection, tid: int, back: int, key: tuple[object, ...]) -> bool:
    """Whether a change of this node's to the row ``key`` is still in flight."""
    where = " AND ".join(f"k{i} IS ?" for i in range(len(key)))
    return bool(conn.execute(
        f"SELECT 1 FROM {ddl.LOG} WHERE tid = ? AND id > ? AND {where} LIMIT 1",
        (tid, back, *key)).fetchone())
