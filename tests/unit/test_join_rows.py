"""What counts as a database of its own, and how a merge writes the copy's rows (real SQLite
files; the node-level behaviour is in tests/integration/test_join.py)."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc.install import install
from harmonylite.config import Config, parse_config, with_join
from harmonylite.errors import ConfigError
from harmonylite.replication.seqmap import write_seq_map
from harmonylite.restore.join import keep_copy
from harmonylite.restore.join_rows import OwnData, lacking_rows, merge_rows, own_data, republish

STREAM = "harmonylite-changes-c-1"


def cfg(**extra: object) -> Config:
    return parse_config({"db_path": "/x/data.db", "node_id": 1, **extra})[0]


def make(path: Path, *sql: str) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for s in sql:
            conn.execute(s)
    finally:
        conn.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_rows_without_positions_are_its_own_and_reading_changes_nothing(tmp_path: Path) -> None:
    db = make(tmp_path / "data.db", "CREATE TABLE t(id INTEGER PRIMARY KEY)",
              "INSERT INTO t VALUES (1), (2)", "CREATE TABLE e(id INTEGER PRIMARY KEY)",
              "CREATE TABLE django_migrations(id INTEGER PRIMARY KEY)",
              "INSERT INTO django_migrations VALUES (1)")
    before = digest(db)
    own = own_data(cfg(), db, tmp_path / "seq-map.cbor")
    assert own == OwnData({"t": 2})  # empty and excluded tables do not count
    assert str(own) == "t: 2 rows"
    assert digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.db"]


def test_not_its_own(tmp_path: Path) -> None:
    c = cfg()
    seq_map = tmp_path / "seq-map.cbor"
    assert own_data(c, tmp_path / "missing.db", seq_map) is None
    empty = make(tmp_path / "empty.db", "CREATE TABLE t(id INTEGER PRIMARY KEY)")
    assert own_data(c, empty, seq_map) is None
    db = make(tmp_path / "data.db", "CREATE TABLE t(id INTEGER PRIMARY KEY)",
              "INSERT INTO t VALUES (1)")
    conn = sqlite3.connect(db, isolation_level=None)
    install(conn)
    conn.close()
    assert own_data(c, db, seq_map) == OwnData({"t": 1})  # capture alone is no position
    write_seq_map(seq_map, {})
    assert own_data(c, db, seq_map) is None  # it ran harmonylite: the seed's forced restore
    seq_map.unlink()
    make(db, f"INSERT INTO __harmonylite__seq(stream, seq) VALUES ('{STREAM}', 0)")
    assert own_data(c, db, seq_map) is None
    # Positions on another cluster's streams are no position here.
    other = cfg(nats={"stream_prefix": "elsewhere"})
    assert own_data(other, db, seq_map) == OwnData({"t": 1})


def test_merge_writes_the_copy_over_the_snapshot_through_capture(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture
                                                                  ) -> None:
    old = make(tmp_path / "old.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE, x)",
               "INSERT INTO t VALUES (1, 'mine', 9), (3, 'three', 3), (4, 'taken', 4)",
               "CREATE TABLE bag(a, b)", "INSERT INTO bag VALUES (1, 2), (5, 6)",
               "CREATE TABLE only_here(id INTEGER PRIMARY KEY)", "INSERT INTO only_here VALUES (7)")
    live = make(tmp_path / "data.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT UNIQUE)",
                "INSERT INTO t VALUES (1, 'theirs'), (2, 'taken')",
                "CREATE TABLE bag(a, b)", "INSERT INTO bag VALUES (1, 2)")
    conn = sqlite3.connect(live, isolation_level=None)
    try:
        install(conn)
        caplog.set_level(logging.WARNING)
        merged = merge_rows(conn, keep_copy(old), cfg())
        assert merged == 4  # t 1 and 3, bag (5, 6), only_here 7; t 4's UNIQUE value is taken
        assert conn.execute("SELECT * FROM t ORDER BY id").fetchall() == [
            (1, "mine"), (2, "taken"), (3, "three")]
        assert conn.execute("SELECT * FROM bag ORDER BY a").fetchall() == [(1, 2), (5, 6)]
        assert conn.execute("SELECT * FROM only_here").fetchall() == [(7,)]
        captured = conn.execute("SELECT count(*) FROM __harmonylite__log").fetchone()[0]
        assert captured >= 4
    finally:
        conn.close()
    text = caplog.text
    assert "has no column(s) x" in text
    assert "row of table 't' with key [4] not merged" in text
    assert "created table(s) only_here" in text


def test_republish_writes_every_row_again(tmp_path: Path) -> None:
    db = make(tmp_path / "data.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)",
              "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        install(conn)
        assert republish(conn, OwnData({"t": 2})) == 2
        assert conn.execute("SELECT count(*) FROM __harmonylite__log").fetchone()[0] == 2
    finally:
        conn.close()


def test_copy_is_consistent_and_standalone(tmp_path: Path) -> None:
    db = make(tmp_path / "data.db", "PRAGMA journal_mode = WAL", "CREATE TABLE t(id)",
              "INSERT INTO t VALUES (1)")
    copy = keep_copy(db)
    assert copy.name.startswith("data.db.before-join-")
    assert keep_copy(db) != copy  # never over an earlier copy
    conn = sqlite3.connect(copy)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert conn.execute("SELECT * FROM t").fetchall() == [(1,)]
    finally:
        conn.close()


def test_join_values() -> None:
    assert cfg().snapshot.join == "refuse"
    assert cfg(snapshot={"join": "merge"}).snapshot.join == "merge"
    assert with_join(cfg(), "replace").snapshot.join == "replace"
    with pytest.raises(ConfigError, match=r"snapshot.join = 'yes': must be one of refuse, "):
        cfg(snapshot={"join": "yes"})
    with pytest.raises(ConfigError, match=r"-join = 'yes': must be one of refuse, replace, merge"):
        with_join(cfg(), "yes")


def test_rows_the_snapshot_lacks(tmp_path: Path) -> None:
    snap = make(tmp_path / "snap.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)",
                "INSERT INTO t VALUES (1, 'a'), (2, 'b'), (3, 'c')")
    same = make(tmp_path / "same.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)",
                "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    before = digest(same)
    assert lacking_rows(same, snap, OwnData({"t": 2})) is None  # a subset: nothing is lost
    assert digest(same) == before
    other = make(tmp_path / "other.db", "CREATE TABLE t(id INTEGER PRIMARY KEY, v)",
                 "INSERT INTO t VALUES (1, 'a'), (2, 'changed'), (9, 'new')",
                 "CREATE TABLE u(id)", "INSERT INTO u VALUES (1)")
    assert lacking_rows(other, snap, OwnData({"t": 3, "u": 1})) == OwnData({"t": 2, "u": 1})
