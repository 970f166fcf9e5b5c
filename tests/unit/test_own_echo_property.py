"""A node's own changes coming back never step its rows back.

One node writes (upserts, deletes, key changes), publishes batches when told, applies the next
message of the stream (its own changes, coming back) when told and prunes its change log when
told, in any interleaving. No other node writes, so applying the stream must never change what
the writer shows: each row is always as its application last wrote it. A node that only applies
the stream ends identical.

Real SQLite files, the real capture triggers, the real row reader and the real applier.
"""

from __future__ import annotations

import sqlite3
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from harmonylite.cdc import changelog
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import encode

SCHEMA = "CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)"

step = st.one_of(
    st.tuples(st.sampled_from(["add", "delete", "rekey"]), st.integers(0, 3)),
    st.tuples(st.sampled_from(["publish", "apply", "prune"]), st.just(0)),
)


def _db(path: Path) -> sqlite3.Connection:
    conn = open_connection(path)
    conn.execute(SCHEMA)
    install(conn)
    return conn


def _rows(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    return conn.execute("SELECT * FROM acct ORDER BY id").fetchall()


@settings(max_examples=400, deadline=None)
@given(steps=st.lists(step, min_size=1, max_size=40))
def test_own_changes_coming_back_never_step_a_row_back(steps: list[tuple[str, int]]) -> None:
    stream: list[bytes] = []
    with tempfile.TemporaryDirectory() as d:
        conn = _db(Path(d) / "writer.db")
        applier = Applier(origin="1:e1")
        applied = 0

        def apply(upto: int) -> None:
            nonlocal applied
            while applied < upto:
                applied += 1
                applier.apply(conn, "s-1", [(applied, stream[applied - 1])])

        def publish() -> None:
            changes, shapes = read_changes(conn, changelog.watermark(conn), 10_000)
            if changes:
                stream.append(encode(1, changes, shapes, False, "e1"))
                changelog.mark_published(conn, changes[-1].id)

        for kind, key in steps:
            if kind == "add":  # the application's read-modify-write
                conn.execute("INSERT INTO acct VALUES (?, 1) ON CONFLICT(id) DO UPDATE SET "
                             "bal = bal + 1", (key,))
            elif kind == "delete":
                conn.execute("DELETE FROM acct WHERE id = ?", (key,))
            elif kind == "rekey":
                conn.execute("UPDATE OR IGNORE acct SET id = (id + 1) % 4 WHERE id = ?", (key,))
            elif kind == "publish":
                publish()
            elif kind == "prune":
                applier.prune_log(conn)
            else:
                # One message: the application may read the row before the next one.
                shown = _rows(conn)
                apply(min(applied + 1, len(stream)))
                assert _rows(conn) == shown, "applying its own changes stepped a row back"
        shown = _rows(conn)
        publish()
        apply(len(stream))
        assert _rows(conn) == shown
        receiver = _db(Path(d) / "receiver.db")
        Applier(origin="3:e3").apply(receiver, "s-1", list(enumerate(stream, start=1)))
        assert _rows(receiver) == shown, stream
        conn.close()
        receiver.close()
