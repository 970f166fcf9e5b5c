"""Stream positions and origin marks not written yet: those of groups that wrote nothing else.

A group of messages that holds only this node's own changes coming back, each already the
row's state here, changes nothing in the database but the stream position
(``__harmonylite__seq``) and its origin's mark (``__harmonylite__origins``). Writing those alone
would cost a write transaction (the write lock the application waits for, WAL frames, its page
cache emptied) per group at the application's pace. They are kept here instead and written with
the next write transaction of the applier, or on their own once they are ``MAX_AGE`` old (the node
asks for it), and at the node's stop. A snapshot taken meanwhile records positions up to
``MAX_AGE`` older than its rows: a node restoring it applies those messages again (harmless).

A crash loses at most these: the next start applies those messages again from the older
position, which DESIGN rule 2 makes harmless (changes carry whole rows, and this node's own
changes from before a start are recognised as its own, see ``node.origin``).
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass

from harmonylite.cdc import ddl

MAX_AGE = 0.25  # seconds a position may wait before a write transaction of its own


class DeferredPositions:
    def __init__(self) -> None:
        self.seqs: dict[str, int] = {}  # stream -> last applied sequence
        self.marks: dict[tuple[str, str], int] = {}  # (origin, stream) -> highest change id
        self.since: float | None = None  # monotonic time of the oldest one kept

    def __bool__(self) -> bool:
        return bool(self.seqs or self.marks)

    def due(self) -> bool:
        return self.since is not None and time.monotonic() - self.since >= MAX_AGE

    def note(self, stream: str, seq: int, marks: dict[str, int]) -> None:
        if self.since is None:
            self.since = time.monotonic()
        self.seqs[stream] = max(self.seqs.get(stream, 0), seq)
        for origin, hwm in marks.items():
            k = (origin, stream)
            self.marks[k] = max(self.marks.get(k, 0), hwm)

    def marks_of(self, stream: str) -> dict[str, int]:
        return {o: h for (o, s), h in self.marks.items() if s == stream}

    def origin_marks(self, conn: sqlite3.Connection, stream: str) -> dict[str, int]:
        """The origins' marks of ``stream``: those written, raised by those kept here."""
        marks = {str(o): int(h) for o, h in conn.execute(
            f"SELECT origin, hwm FROM {ddl.ORIGINS} WHERE stream = ?", (stream,))}
        for o, h in self.marks_of(stream).items():
            marks[o] = max(marks.get(o, 0), h)
        return marks

    def take(self) -> Kept:
        """Hand over what is kept, to be written by the caller's write transaction."""
        out = Kept(self.seqs, self.marks, self.since)
        self.seqs, self.marks, self.since = {}, {}, None
        return out

    def restore(self, kept: Kept) -> None:
        """The write transaction that took them rolled back: keep them again."""
        for s, q in kept.seqs.items():
            self.seqs[s] = max(self.seqs.get(s, 0), q)
        for k, h in kept.marks.items():
            self.marks[k] = max(self.marks.get(k, 0), h)
        if kept.since is not None and (self.since is None or kept.since < self.since):
            self.since = kept.since


@dataclass(frozen=True)
class Kept:
    seqs: dict[str, int]
    marks: dict[tuple[str, str], int]
    since: float | None

    def marks_of(self, stream: str) -> dict[str, int]:
        return {o: h for (o, s), h in self.marks.items() if s == stream}

    def write(self, conn: sqlite3.Connection) -> None:
        """Inside the caller's write transaction."""
        if self.marks:
            conn.executemany(
                f"INSERT INTO {ddl.ORIGINS}(origin, stream, hwm) VALUES (?, ?, ?) "
                "ON CONFLICT(origin, stream) DO UPDATE SET hwm = max(hwm, excluded.hwm)",
                [(o, s, h) for (o, s), h in self.marks.items()])
        if self.seqs:
            conn.executemany(
                f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?) ON CONFLICT(stream) "
                "DO UPDATE SET seq = max(seq, excluded.seq)", list(self.seqs.items()))
