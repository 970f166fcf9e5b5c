"""A writing node ends identical to a node that only applies the stream.

The writer's local changes wait unpublished while it applies changes of other nodes; it then
publishes them (they land later in the stream) and applies its own echo. A second node applies the
same stream from the start. Whatever the interleaving, both must end with the same rows: the
writer's shortcut (an incoming change to a row with a pending local change is skipped, because the
local change follows it in the stream) must have every other effect of the skipped change too —
a row it displaces through a UNIQUE value is displaced on the writer as on every other node.

Real SQLite files, the real capture triggers, the real row reader and the real applier.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from hypothesis import example, given, settings
from hypothesis import strategies as st

from harmonylite.cdc import changelog
from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import encode
from harmonylite.replication.own_returns import OwnReturns

SCHEMA = "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, n INTEGER)"
SHAPES = {"users": TableShape("users", ("id", "email", "n"), ("id",), single_order=True)}
EMAILS = ["a@x", "b@x", "c@x", None]

step = st.one_of(
    st.tuples(st.just("remote"), st.sampled_from([1, 3]), st.integers(0, 3),
              st.sampled_from(EMAILS)),
    st.tuples(st.just("local"), st.sampled_from([1, 3, 4, 5]), st.integers(0, 3),
              st.sampled_from(EMAILS)),
    st.tuples(st.just("publish"), st.just(0), st.just(0), st.just(None)),
    st.tuples(st.just("apply"), st.just(0), st.just(0), st.just(None)),
    st.tuples(st.just("prune"), st.just(0), st.just(0), st.just(None)),
)


def _db(path: Path) -> sqlite3.Connection:
    conn = open_connection(path)
    conn.execute(SCHEMA)
    install(conn)
    return conn


def _rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return conn.execute("SELECT * FROM users ORDER BY id").fetchall()


class Writer:
    """Node 1: writes locally, publishes when told, applies the stream when told."""

    def __init__(self, path: Path, stream: list[bytes]) -> None:
        self.conn = _db(path)
        self.stream = stream
        self.returns = OwnReturns()
        self.applier = Applier(origin="1:e1", returns=self.returns)
        self.applied = 0

    def write(self, op: int, key: int, email: object) -> None:
        try:
            if op == 3:
                self.conn.execute("DELETE FROM users WHERE id = ?", (key,))
            elif op == 4:  # REPLACE removes a row holding the e-mail, without a delete trigger
                self.conn.execute("INSERT OR REPLACE INTO users VALUES (?, ?, 7)", (key, email))
            elif op == 5:  # a key change
                self.conn.execute("UPDATE users SET id = (id + 1) % 4 WHERE id = ?", (key,))
            else:
                self.conn.execute(
                    "INSERT INTO users VALUES (?, ?, 1) ON CONFLICT(id) DO UPDATE SET "
                    "email = excluded.email, n = n + 1", (key, email))
        except sqlite3.IntegrityError:
            pass  # the application's write was refused here: nothing captured

    def publish(self) -> None:
        changes, shapes = read_changes(self.conn, changelog.watermark(self.conn), 10_000)
        if changes:
            self.stream.append(encode(1, changes, shapes, False, "e1"))
            changelog.mark_published(self.conn, changes[-1].id)
            self.returns.sent("s-1", changes[-1].id)  # as the publisher notes an acknowledgement

    def prune(self) -> None:  # the node's housekeeping
        changelog.prune(self.conn, self.returns.floor())

    def apply_one(self) -> None:
        if self.applied < len(self.stream):
            self.applied += 1
            self.applier.apply(self.conn, "s-1", [(self.applied, self.stream[self.applied - 1])])

    def apply(self) -> None:
        while self.applied < len(self.stream):
            self.applied += 1
            self.applier.apply(self.conn, "s-1",
                               [(self.applied, self.stream[self.applied - 1])])


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=30))
# The writer's own change comes back while a newer local change to its row is on its way: it is
# not written, yet it still displaces the row that took its UNIQUE value meanwhile.
@example(steps=[("remote", 1, 0, "c@x"), ("local", 1, 2, "c@x"), ("publish", 0, 0, None),
                ("local", 1, 2, "a@x")])
# A value moved between two rows and back, each move published and pruned from the log before
# its echo is applied: the echo of the first move must not take the row the second gave it to.
@example(steps=[("local", 1, 1, "a@x"), ("publish", 0, 0, None), ("apply", 0, 0, None),
                ("local", 1, 1, None), ("local", 1, 2, "a@x"), ("publish", 0, 0, None),
                ("prune", 0, 0, None), ("local", 1, 2, None), ("local", 1, 1, "a@x"),
                ("publish", 0, 0, None), ("prune", 0, 0, None), ("apply", 0, 0, None)])
def test_a_writer_with_pending_changes_ends_like_a_pure_receiver(
        steps: list[tuple[str, int, int, object]]) -> None:
    stream: list[bytes] = []
    with tempfile.TemporaryDirectory() as d:
        writer = Writer(Path(d) / "writer.db", stream)
        remote_id = 0
        for kind, op, key, email in steps:
            if kind == "remote":  # node 2 wrote this row; it is in the stream now
                remote_id += 1
                values = (key, None, None) if op == 3 else (key, email, 100 + remote_id)
                stream.append(encode(2, [Change(remote_id, "users", op, values)], SHAPES,
                                     False, "e2"))
            elif kind == "local":
                writer.write(op, key, email)
            elif kind == "publish":
                writer.publish()
            elif kind == "prune":
                writer.prune()
            else:
                writer.apply()
        writer.publish()
        writer.apply()
        receiver = _db(Path(d) / "receiver.db")
        Applier(origin="3:e3").apply(receiver, "s-1", list(enumerate(stream, start=1)))
        assert _rows(writer.conn) == _rows(receiver), stream
        writer.conn.close()
        receiver.close()


alone = st.lists(st.one_of(
    st.tuples(st.just("local"), st.sampled_from([1, 3, 4, 5]), st.integers(0, 3),
              st.sampled_from(EMAILS)),
    st.tuples(st.sampled_from(["publish", "prune", "apply"]), st.just(0), st.just(0),
              st.just(None))), min_size=1, max_size=30)


@settings(max_examples=300, deadline=None)
@given(steps=alone)
# A value moved between two rows and back, each move published and pruned from the log before
# its echo comes back: the echo of the first move must not take the row the second gave it to.
@example(steps=[("local", 1, 1, "a@x"), ("publish", 0, 0, None), ("apply", 0, 0, None),
                ("local", 1, 1, None), ("local", 1, 2, "a@x"), ("publish", 0, 0, None),
                ("prune", 0, 0, None), ("local", 1, 2, None), ("local", 1, 1, "a@x"),
                ("local", 1, 3, "c@x"), ("publish", 0, 0, None), ("prune", 0, 0, None),
                ("apply", 0, 0, None), ("apply", 0, 0, None)])
def test_a_writer_alone_never_sees_its_own_echoes_change_its_rows(
        steps: list[tuple[str, int, int, object]]) -> None:
    """The application reads and writes its rows while their changes come back: with no other
    node writing, nothing the node applies may change them (an update would find its row
    gone), however the log was pruned meanwhile."""
    stream: list[bytes] = []
    with tempfile.TemporaryDirectory() as d:
        writer = Writer(Path(d) / "writer.db", stream)
        for kind, op, key, email in [*steps, ("publish", 0, 0, None)]:
            if kind == "local":
                writer.write(op, key, email)
            elif kind == "publish":
                writer.publish()
            elif kind == "prune":
                writer.prune()
            else:  # one message: the application may write before the next
                before = _rows(writer.conn)
                writer.apply_one()
                assert _rows(writer.conn) == before, stream
        writer.apply()
        assert not writer.conn.execute("SELECT * FROM __harmonylite__conflicts").fetchall()
        writer.conn.close()
