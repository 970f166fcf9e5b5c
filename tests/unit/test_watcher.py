"""The change watcher on a real SQLite file."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from harmonylite.replication.watcher import ChangeWatcher


def _db(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    conn.commit()
    conn.close()


def test_a_commit_made_before_the_watcher_looked_wakes_the_publisher(tmp_path: Path) -> None:
    """A commit that lands after the publisher's first look but before the watcher's first read
    of ``data_version`` (a watcher thread started late) is never seen as a change: the watcher
    wakes the publisher once when it starts, so such a commit is published without waiting for
    another one."""
    db = tmp_path / "data.db"
    _db(db)
    conn = sqlite3.connect(db)
    conn.execute("INSERT INTO t VALUES (1)")  # the commit nobody has looked at yet
    conn.commit()
    woke = threading.Event()
    watcher = ChangeWatcher(str(db), 0.002, woke.set)
    watcher.start()
    try:
        assert woke.wait(10), "the watcher never woke the publisher for the earlier commit"
    finally:
        watcher.stop()
        conn.close()


def test_a_commit_after_the_start_wakes_the_publisher(tmp_path: Path) -> None:
    db = tmp_path / "data.db"
    _db(db)
    woke = threading.Event()
    watcher = ChangeWatcher(str(db), 0.002, woke.set)
    watcher.start()
    try:
        assert woke.wait(10)
        woke.clear()
        conn = sqlite3.connect(db)
        conn.execute("INSERT INTO t VALUES (2)")
        conn.commit()
        conn.close()
        assert woke.wait(10), "a commit after the start did not wake the publisher"
    finally:
        watcher.stop()
