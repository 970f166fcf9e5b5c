"""Recovery's pure decisions and the install step, on real SQLite files."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from harmonylite.cdc.install import install
from harmonylite.restore import db_file as inst
from harmonylite.restore.coverage import Gap, gaps, lost

S1, S2 = "harmonylite-changes-c-1", "harmonylite-changes-c-2"


def test_gaps_fresh_empty_and_dropped_streams() -> None:
    # A fresh stream (first 1 when empty) never shows a gap, whatever the position.
    assert gaps({}, {S1: 1}) == []
    assert gaps({S1: 5}, {S1: 1}) == []
    # The stream starts right after the position: nothing missing.
    assert gaps({S1: 99}, {S1: 100}) == []
    # Messages 11..49 are gone; an unknown stream counts from 0.
    assert gaps({S1: 10}, {S1: 50, S2: 3}) == [Gap(S1, 11, 49), Gap(S2, 1, 2)]
    assert str(Gap(S1, 11, 49)) == f"{S1} 11..49"
    assert lost({S1: 10}, {S1: 50}) == 39
    assert lost({S1: 60}, {S1: 50}) == 0


def _db(path: Path, rows: int, page_size: int = 4096) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(f"v{i}" * 30,) for i in range(rows)])
    conn.close()


def _snapshot_file(path: Path, rows: int, page_size: int = 4096) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute(f"PRAGMA page_size = {page_size}")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE TABLE extra (x)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [(f"s{i}",) for i in range(rows)])
    conn.close()


def test_install_replaces_content_and_sets_positions_while_a_reader_stays_open(
    tmp_path: Path,
) -> None:
    live, snap = tmp_path / "live.db", tmp_path / "snap.db"
    _db(live, 500, page_size=8192)
    _snapshot_file(snap, 300)  # other page size: the copy is converted first
    reader = sqlite3.connect(str(live), isolation_level=None)
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (500,)
    inst.install_file(snap, live, {S1: 42, S2: 7})
    assert reader.execute("SELECT count(*) FROM t").fetchone() == (300,)
    assert reader.execute("SELECT stream, seq FROM __harmonylite__seq ORDER BY 1").fetchall() \
        == [(S1, 42), (S2, 7)]
    assert reader.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert reader.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    reader.close()
    assert inst.applied_positions(live) == {S1: 42, S2: 7}
    assert inst.pending_changes(live) == 0


def test_install_into_a_missing_file(tmp_path: Path) -> None:
    live, snap = tmp_path / "new.db", tmp_path / "snap.db"
    _snapshot_file(snap, 10, page_size=1024)
    inst.install_file(snap, live, {S1: 3})
    conn = sqlite3.connect(str(live))
    assert conn.execute("PRAGMA page_size").fetchone() == (1024,)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (10,)
    conn.close()


def test_pending_changes_and_epoch(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _db(db, 0)
    assert inst.pending_changes(db) == 0  # no change capture yet
    assert inst.epoch_of(db) is None
    conn = sqlite3.connect(str(db), isolation_level=None)
    install(conn)
    conn.executemany("INSERT INTO t(v) VALUES (?)", [("x",)] * 4)
    conn.close()
    assert inst.pending_changes(db) == 4
    assert inst.pending_changes(tmp_path / "missing.db") == 0


def test_in_use_sees_an_idle_wal_connection(tmp_path: Path) -> None:
    db = tmp_path / "a.db"
    _db(db, 1)
    assert inst.in_use(db) is None
    other = sqlite3.connect(str(db), isolation_level=None)
    other.execute("SELECT count(*) FROM t").fetchone()  # idle, but open in WAL mode
    # Locks are per process: look from a child process, as the CLI would.
    code = ("import sys; from pathlib import Path; from harmonylite.restore.db_file import in_use; "
            "print(in_use(Path(sys.argv[1])))")
    out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True,
                         check=True).stdout
    assert "open in another process" in out
    other.close()
    out = subprocess.run([sys.executable, "-c", code, str(db)], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "None"


def test_a_write_between_the_publish_and_the_install_rolls_the_install_back(
    tmp_path: Path,
) -> None:
    from harmonylite.cdc import changelog

    live, snap = tmp_path / "live.db", tmp_path / "snap.db"
    _db(live, 200)
    conn = sqlite3.connect(str(live), isolation_level=None)
    install(conn)
    # Everything captured so far was published...
    conn.execute("UPDATE __harmonylite__state SET v = (SELECT coalesce(max(id), 0) "
                 "FROM __harmonylite__log) WHERE k = 'published'")
    # ...then the application writes once more before the install takes the lock.
    conn.execute("INSERT INTO t(v) VALUES ('written at the last moment')")
    _snapshot_file(snap, 50)
    check = lambda: inst.check_nothing_pending(live)  # noqa: E731
    try:
        inst.install_file(snap, live, {S1: 9}, locked_check=check)
    except inst.PendingAppeared as exc:
        assert exc.count == 1
    else:
        raise AssertionError("the install went ahead over an unpublished change")
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (201,)  # untouched
    changelog.mark_published(conn, conn.execute("SELECT max(id) FROM __harmonylite__log")
                             .fetchone()[0])
    inst.install_file(snap, live, {S1: 9}, locked_check=check)
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (50,)
    conn.close()


def test_install_with_the_check_over_a_rollback_journal_database(tmp_path: Path) -> None:
    live, snap = tmp_path / "live.db", tmp_path / "snap.db"
    conn = sqlite3.connect(str(live), isolation_level=None)  # journal_mode = delete
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    conn.executemany("INSERT INTO t(v) VALUES (?)", [("x" * 200,) for _ in range(500)])
    conn.close()
    _snapshot_file(snap, 40)
    inst.install_file(snap, live, {S1: 1}, locked_check=lambda: inst.check_nothing_pending(live))
    conn = sqlite3.connect(str(live))
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (40,)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
