"""Capture on one database, wire format, apply on another: no NATS, real SQLite files."""

from __future__ import annotations

import math
import sqlite3
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harmonylite.cdc import changelog, origin
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import decode, encode, shard_of

SCHEMA = "CREATE TABLE v(id INTEGER PRIMARY KEY, a, b, c)"


def pair(tmp_path: Path, schema: str = SCHEMA) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    src = open_connection(tmp_path / "src.db")
    dst = open_connection(tmp_path / "dst.db")
    for c in (src, dst):
        for stmt in schema.split(";"):
            c.execute(stmt)
        install(c)
    return src, dst


def ship(src: sqlite3.Connection, dst: sqlite3.Connection, applier: Applier, seq: int,
         compress: bool = True) -> int:
    changes, shapes = read_changes(src, changelog.watermark(src), 10_000)
    changelog.mark_published(src, changes[-1].id)
    payload = encode(1, changes, shapes, compress)
    result = applier.apply(dst, "s-1", [(seq, payload)])
    assert result.failed == []
    return result.rows


def settle(conn: sqlite3.Connection) -> None:
    """Mark this database's own captured changes as published."""
    changelog.mark_published(conn, conn.execute("SELECT max(id) FROM __harmonylite__log")
                             .fetchone()[0])


sqlite_values = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([-(2**63), 2**63 - 1, 0, -1]),
    st.floats(allow_nan=False),  # SQLite stores NaN as NULL
    st.text(),  # includes NUL and non-ASCII
    st.binary(max_size=300),
)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.tuples(sqlite_values, sqlite_values, sqlite_values), min_size=1,
                       max_size=5),
       compress=st.booleans())
def test_every_sqlite_value_round_trips_exactly(tmp_path_factory: pytest.TempPathFactory,
                                                values: list[tuple[object, object, object]],
                                                compress: bool) -> None:
    src, dst = pair(tmp_path_factory.mktemp("rt"))
    for i, row in enumerate(values):
        src.execute("INSERT INTO v VALUES (?, ?, ?, ?)", (i, *row))
    ship(src, dst, Applier(), 1, compress)
    q = "SELECT id, a, typeof(a), b, typeof(b), c, typeof(c) FROM v ORDER BY id"
    got, want = dst.execute(q).fetchall(), src.execute(q).fetchall()
    assert got == want
    for g, w in zip(got, want, strict=True):  # -0.0 == 0.0: compare float signs too
        for x, y in zip(g, w, strict=True):
            if isinstance(x, float):
                assert math.copysign(1, x) == math.copysign(1, y)


def test_upsert_neither_cascades_nor_nulls_missing_columns(tmp_path: Path) -> None:
    schema = ("CREATE TABLE parent(id INTEGER PRIMARY KEY, name TEXT);"
              "CREATE TABLE child(id INTEGER PRIMARY KEY, pid INTEGER REFERENCES parent(id) "
              "ON DELETE CASCADE)")
    src, dst = pair(tmp_path, schema)
    dst.execute("PRAGMA foreign_keys = ON")
    dst.execute("ALTER TABLE parent ADD COLUMN local_note TEXT")
    dst.execute("INSERT INTO parent VALUES (1, 'old', 'keep me')")
    dst.execute("INSERT INTO child VALUES (10, 1)")
    settle(dst)
    src.execute("INSERT INTO parent VALUES (1, 'new')")
    ship(src, dst, Applier(), 1)
    assert dst.execute("SELECT * FROM parent").fetchall() == [(1, "new", "keep me")]
    assert dst.execute("SELECT * FROM child").fetchall() == [(10, 1)]


def test_replicated_writes_are_not_captured_again(tmp_path: Path) -> None:
    src, dst = pair(tmp_path)
    src.execute("INSERT INTO v VALUES (1, 'a', 'b', 'c')")
    ship(src, dst, Applier(), 1)
    assert changelog.pending_count(dst) == 0
    assert dst.execute("SELECT seq FROM __harmonylite__seq WHERE stream = 's-1'").fetchall() == [
        (1,)]


def test_pending_local_change_is_not_stepped_back(tmp_path: Path) -> None:
    src, dst = pair(tmp_path)
    src.execute("INSERT INTO v VALUES (1, 'remote', NULL, NULL)")
    dst.execute("INSERT INTO v VALUES (1, 'local, not yet published', NULL, NULL)")
    applier = Applier()
    rows = ship(src, dst, applier, 1)
    assert rows == 0
    assert dst.execute("SELECT a FROM v").fetchone() == ("local, not yet published",)


def test_local_change_already_sent_does_not_hide_later_remote_changes(tmp_path: Path) -> None:
    """A local change being published may already sit in the stream before an incoming one: the
    incoming change must be applied (our own message, if it comes later, is applied in turn)."""
    src, dst = pair(tmp_path)
    dst.execute("INSERT INTO v VALUES (1, 'local, in flight', NULL, NULL)")
    in_flight = dst.execute("SELECT max(id) FROM __harmonylite__log").fetchone()[0]
    changelog.set_intent(dst, in_flight)  # handed to the publisher, not yet acknowledged
    src.execute("INSERT INTO v VALUES (1, 'remote, later in the stream', NULL, NULL)")
    assert ship(src, dst, Applier(), 1) == 1
    assert dst.execute("SELECT a FROM v").fetchone() == ("remote, later in the stream",)


def test_garbage_is_skipped_and_unknown_tables_are_parked_until_they_exist(
    tmp_path: Path,
) -> None:
    src, dst = pair(tmp_path, SCHEMA + "; CREATE TABLE only_src(id INTEGER PRIMARY KEY, v TEXT)")
    dst.execute("DROP TABLE only_src")
    src.execute("INSERT INTO only_src VALUES (5, 'first')")
    src.execute("UPDATE only_src SET v = 'second' WHERE id = 5")
    unknown_table = encode(1, *read_changes(src, 0, 10), True)
    src.execute("INSERT INTO v VALUES (7, 1, 2, 3)")
    good = encode(1, *read_changes(src, 2, 10), False)
    wrong_shape = cbor2.dumps({"v": 1, "n": 1, "t": {"v": ["id"]}, "k": {"v": ["id"]},
                               "c": [["v", 1, [1, 2]]]})
    applier = Applier()
    result = applier.apply(dst, "s-1", [(1, b"\x00garbage"), (2, unknown_table),
                                        (3, wrong_shape), (4, good)])
    assert [seq for seq, _ in result.failed] == [1, 3]
    assert result.parked == 1  # the insert and the update of row 5, read once when published
    assert result.last_seq == 4
    assert dst.execute("SELECT * FROM v").fetchall() == [(7, 1, 2, 3)]
    # Nothing is lost: once the table exists, its changes are applied in their order.
    assert applier.retry_parked(dst) == 0
    dst.execute("CREATE TABLE only_src(id INTEGER PRIMARY KEY, v TEXT)")
    assert applier.retry_parked(dst) == 1
    assert dst.execute("SELECT * FROM only_src").fetchall() == [(5, "second")]
    assert dst.execute("SELECT count(*) FROM __harmonylite__parked").fetchone() == (0,)
    assert changelog.pending_count(dst) == 0  # applied as the replicator: not captured again


def test_decode_rejects_non_batches() -> None:
    from harmonylite.errors import DecodeError

    for junk in (b"", b"\x28\xb5\x2f\xfd\x00\x00", cbor2.dumps([1, 2]), cbor2.dumps({"v": 2})):
        with pytest.raises(DecodeError):
            decode(junk)


def test_shard_is_stable_and_spreads() -> None:
    assert shard_of("t", [1], 1) == 1
    shards = {shard_of("t", [i], 8) for i in range(200)}
    assert shards == set(range(1, 9))
    assert shard_of("t", ["x", 2], 8) == shard_of("t", ["x", 2], 8)


@pytest.mark.parametrize("schema", [SCHEMA, "CREATE TABLE v(id TEXT PRIMARY KEY, a, b, c)"],
                         ids=["keyed", "nullable-key"])
def test_values_that_compare_equal_but_differ_are_written(tmp_path: Path, schema: str) -> None:
    """0 and -0.0, 1 and 1.0 are equal to SQLite's IS, not the same value: an incoming change
    must leave exactly its value (storage class and sign), not the one that was there."""
    src, dst = pair(tmp_path, schema)
    key = 1 if schema == SCHEMA else "k"
    dst.execute("INSERT INTO v VALUES (?, -0.0, 1.0, 0.0)", (key,))
    settle(dst)
    src.execute("INSERT INTO v VALUES (?, 0, 1, -0.0)", (key,))
    ship(src, dst, Applier(), 1)
    a, b, c = dst.execute("SELECT a, b, c FROM v").fetchone()
    assert (type(a), a, type(b), b) == (int, 0, int, 1)
    assert isinstance(c, float) and math.copysign(1.0, c) == -1.0


def test_own_change_back_on_an_old_stream_is_not_in_flight_past_the_cut(tmp_path: Path) -> None:
    """After a shard-count change a row's changes move to another stream. This node's own insert
    of the row went out under the old count and came back on its old stream ("s-2"); the marks
    of the row's new stream ("s-1") know nothing of it. Past the cut, another node's insert of
    the row, later in the streams' one order, must win here as everywhere."""
    src, dst = pair(tmp_path)
    applier = Applier(origin="2:new", own_origins={"2:old": 10})
    dst.execute("INSERT INTO v VALUES (1, 'own, under the old count', NULL, NULL)")
    settle(dst)  # published and acknowledged (it came back on s-2)
    floor = origin.cut_floor(dst, {"s-1": 9, "s-2": 5}, first_sight=True)
    assert floor == dst.execute("SELECT max(id) FROM __harmonylite__log").fetchone()[0]
    applier.after_cut({"s-1": 9, "s-2": 5}, floor)
    src.execute("INSERT INTO v VALUES (1, 'remote, after the cut', NULL, NULL)")
    assert ship(src, dst, applier, 10) == 1
    assert dst.execute("SELECT a FROM v").fetchone() == ("remote, after the cut",)
    # Taken once: a later start finds the same floor, whatever was published since.
    dst.execute("INSERT INTO v VALUES (2, 'own, under the new count', NULL, NULL)")
    settle(dst)
    assert origin.cut_floor(dst, {"s-1": 9, "s-2": 5}, first_sight=False) == floor
    assert origin.cut_floor(dst, {"s-1": 20}, first_sight=False) == 0
