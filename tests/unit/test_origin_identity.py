"""A database's origin identity (fresh epoch per start, own origins with their bounds) and what a
refused message still tells its dead letter; on real SQLite files."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import cbor2
import pytest
import zstandard

from harmonylite.cdc import changelog, ddl, origin
from harmonylite.cdc.install import install
from harmonylite.replication.deadletter import About, about_message


def _db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    install(conn)
    return conn


def test_every_start_takes_a_new_epoch_and_keeps_the_old_ones_bounded(tmp_path: Path) -> None:
    conn = _db(tmp_path / "a.db")
    e1, e2 = origin.new_epoch(), origin.new_epoch()
    assert e1 != e2 and len(e1) == 16
    assert origin.adopt(conn, 5, e1, tmp_path / "a.db") == {f"5:{e1}": None}
    assert origin.adopt(conn, 5, e1, tmp_path / "a.db") == {f"5:{e1}": None}  # same start
    conn.executemany("INSERT INTO t(v) VALUES (?)", [("x",)] * 3)
    with conn:
        changelog.set_intent(conn, 3, e1)
    # The next start: the first epoch is bounded by what may have gone out under it.
    assert origin.adopt(conn, 5, e2) == {f"5:{e1}": 3, f"5:{e2}": None}
    assert changelog.intent_epoch(conn) == e1  # a re-send keeps its message ids


def test_a_database_from_before_keeps_its_one_epoch_as_its_own(tmp_path: Path) -> None:
    conn = _db(tmp_path / "a.db")
    conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES ('epoch', 'cafe0001')")
    conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES ('publishing', 7)")
    own = origin.adopt(conn, 5, "beef")
    assert own == {"5:cafe0001": 7, "5:beef": None}
    assert changelog.intent_epoch(conn) == "cafe0001"


def test_a_copy_is_said_and_draws_its_own_epoch(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    conn = _db(tmp_path / "a.db")
    origin.adopt(conn, 5, "e1", tmp_path / "a.db")
    conn.close()
    (tmp_path / "b").mkdir()
    shutil.copy2(tmp_path / "a.db", tmp_path / "b" / "a.db")
    copy = sqlite3.connect(str(tmp_path / "b" / "a.db"), isolation_level=None)
    own = origin.adopt(copy, 5, "e2", tmp_path / "b" / "a.db")
    assert own == {"5:e1": 0, "5:e2": None}
    assert "copied or moved" in caplog.text


def test_a_refused_message_names_what_it_carries() -> None:
    doc = {"v": 1, "n": 9, "t": {"t": ["id", "v"]}, "k": {}, "c": [["t", 1, [7, "x"]]]}
    raw = cbor2.dumps(doc)
    assert about_message(raw) == About(9, "t", None)
    assert about_message(raw, lambda table: ("id",)) == About(9, "t", "[7]")
    named = cbor2.dumps({**doc, "k": {"t": ["v"]}})
    assert about_message(zstandard.ZstdCompressor().compress(named)) == About(9, "t", '["x"]')
    assert about_message(b"\xff\x00 not cbor") == About()
    assert about_message(cbor2.dumps({"v": 1})) == About()
    assert about_message(cbor2.dumps({"n": -1, "c": "x", "t": {"a": [], "b": []}})) == \
        About(None, "a, b", None)
