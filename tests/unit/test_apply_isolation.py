"""Applying never stops and never drops: values SQLite cannot take, malformed batches and
failing constraints go to the dead-letter table, the rest of the message is applied, re-sent
batches are ignored, and text that is not valid UTF-8 round-trips byte-exactly."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cbor2

from harmonylite.cdc import changelog
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection
from harmonylite.replication import conflicts, deadletter
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import decode, encode
from harmonylite.replication.outcome import is_transient


def db(path: Path, schema: str) -> sqlite3.Connection:
    conn = open_connection(path)
    for stmt in schema.split(";"):
        conn.execute(stmt)
    install(conn)
    return conn


def captured(src: sqlite3.Connection, epoch: str = "e1") -> bytes:
    changes, shapes = read_changes(src, changelog.watermark(src), 10_000)
    changelog.mark_published(src, changes[-1].id)
    return encode(1, changes, shapes, True, epoch)


def raw_batch(changes: list[list[object]], cols: dict[str, list[str]],
              keys: dict[str, list[str]]) -> bytes:
    return bytes(cbor2.dumps({"v": 1, "n": 9, "t": cols, "k": keys, "c": changes}))


def test_out_of_range_integer_is_dead_lettered_and_the_rest_applies(tmp_path: Path) -> None:
    dst = db(tmp_path / "dst.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    payload = raw_batch([["t", 1, [1, "a"]], ["t", 1, [2, 2**64]], ["t", 1, [3, "c"]]],
                        {"t": ["id", "v"]}, {"t": ["id"]})
    result = Applier().apply(dst, "s-1", [(1, payload)])
    assert result.dead_letters == 1
    assert dst.execute("SELECT id, v FROM t ORDER BY id").fetchall() == [(1, "a"), (3, "c")]
    (dead,) = deadletter.rows(dst)
    assert (dead.stream, dead.seq, dead.origin, dead.table) == ("s-1", 1, 9, "t")
    assert "OverflowError" in dead.error and dead.key == "[2]"
    assert decode(dead.payload).changes[0].values == (2, 2**64)
    assert dst.execute("SELECT seq FROM __harmonylite__seq").fetchone() == (1,)


def test_key_map_missing_its_table_is_dead_lettered_whole(tmp_path: Path) -> None:
    dst = db(tmp_path / "dst.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    bad = raw_batch([["t", 1, [1, "a"]]], {"t": ["id", "v"]}, {})
    good = raw_batch([["t", 1, [2, "b"]]], {"t": ["id", "v"]}, {"t": ["id"]})
    result = Applier().apply(dst, "s-1", [(1, bad), (2, good), (3, b"\x00garbage")])
    assert result.dead_letters == 2
    assert dst.execute("SELECT id FROM t").fetchall() == [(2,)]
    # Refused whole, it still names what it carries: node 9, table t, the key by t's own
    # primary key; garbage names nothing.
    assert [(d.seq, d.origin, d.table, d.key) for d in deadletter.rows(dst)] == [
        (1, 9, "t", "[1]"), (3, None, None, None)]


def test_failing_constraint_takes_no_unrelated_change_with_it(tmp_path: Path) -> None:
    src = db(tmp_path / "src.db", "CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT);"
             "CREATE TABLE other(id INTEGER PRIMARY KEY, v)")
    dst = db(tmp_path / "dst.db", "CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT NOT NULL);"
             "CREATE TABLE other(id INTEGER PRIMARY KEY, v)")
    with src:
        src.execute("INSERT INTO u VALUES (7, NULL)")
        src.executemany("INSERT INTO other VALUES (?, ?)", [(i, i) for i in range(30)])
    result = Applier().apply(dst, "s-1", [(1, captured(src))])
    assert dst.execute("SELECT count(*) FROM other").fetchone() == (30,)
    assert result.dead_letters == 1
    assert "NOT NULL" in deadletter.rows(dst)[0].error


def test_a_unique_value_taken_by_a_later_change_displaces_the_row_and_records_it(
        tmp_path: Path) -> None:
    schema = "CREATE TABLE u(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT)"
    src = db(tmp_path / "src.db", schema)
    dst = db(tmp_path / "dst.db", schema)
    dst.execute("UPDATE __harmonylite__guard SET applying = 1")
    dst.execute("INSERT INTO u VALUES (50, 'x@example.com', 'held here')")
    dst.execute("UPDATE __harmonylite__guard SET applying = 0")
    src.execute("INSERT INTO u VALUES (7, 'x@example.com', 'later')")
    result = Applier().apply(dst, "s-1", [(3, captured(src))])
    assert result.dead_letters == 0
    assert dst.execute("SELECT * FROM u").fetchall() == [(7, "x@example.com", "later")]
    (c,) = conflicts.rows(dst)
    assert (c.table, c.key, c.winner_key, c.stream, c.seq, c.winner_origin) == \
        ("u", "[50]", "[7]", "s-1", 3, 1)
    assert c.displaced == {"id": 50, "email": "x@example.com", "name": "held here"}


def test_a_batch_sent_again_later_is_not_applied_twice(tmp_path: Path) -> None:
    schema = "CREATE TABLE t(id INTEGER PRIMARY KEY, v)"
    src = db(tmp_path / "src.db", schema)
    dst = db(tmp_path / "dst.db", schema)
    src.execute("INSERT INTO t VALUES (1, 'old')")
    first = captured(src)
    applier = Applier()
    applier.apply(dst, "s-1", [(1, first)])
    # another node's later write to the row, then the first batch again (a re-send)
    newer = raw_batch([["t", 2, [1, "newer"]]], {"t": ["id", "v"]}, {"t": ["id"]})
    result = applier.apply(dst, "s-1", [(2, newer), (3, first)])
    assert result.duplicates == 1
    assert dst.execute("SELECT v FROM t").fetchall() == [("newer",)]
    # the mark is durable: a new applier (a restarted node) ignores it too
    Applier().apply(dst, "s-1", [(4, first)])
    assert dst.execute("SELECT v FROM t").fetchall() == [("newer",)]


def test_text_that_is_not_utf8_round_trips_byte_exactly(tmp_path: Path) -> None:
    schema = "CREATE TABLE t(k TEXT PRIMARY KEY, v)"
    src = db(tmp_path / "src.db", schema)
    dst = db(tmp_path / "dst.db", schema)
    src.execute("INSERT INTO t VALUES (CAST(x'ff41' AS TEXT), CAST(x'c328' AS TEXT))")
    src.execute("INSERT INTO t VALUES ('plain', 'ok')")
    applier = Applier()
    applier.apply(dst, "s-1", [(1, captured(src))])
    query = "SELECT hex(k), typeof(k), hex(v), typeof(v) FROM t ORDER BY k"
    assert dst.execute(query).fetchall() == src.execute(query).fetchall()
    src.execute("DELETE FROM t WHERE k = CAST(x'ff41' AS TEXT)")
    applier.apply(dst, "s-1", [(2, captured(src))])
    assert dst.execute(query).fetchall() == src.execute(query).fetchall()


def test_busy_database_is_transient_and_rolls_everything_back(tmp_path: Path) -> None:
    dst = db(tmp_path / "dst.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    dst.execute("PRAGMA busy_timeout = 50")
    holder = sqlite3.connect(tmp_path / "dst.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    payload = raw_batch([["t", 1, [1, "a"]]], {"t": ["id", "v"]}, {"t": ["id"]})
    try:
        Applier().apply(dst, "s-1", [(1, payload)])
    except sqlite3.OperationalError as exc:
        assert is_transient(exc)
    else:
        raise AssertionError("applying under a held write lock should have raised")
    holder.execute("ROLLBACK")
    assert Applier().apply(dst, "s-1", [(1, payload)]).rows == 1
    assert deadletter.rows(dst) == []
