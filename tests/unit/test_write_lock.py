"""The node's writers wait for the write lock in short tries, within the connection's timeout."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from harmonylite.db.connection import open_connection, write_transaction


def test_write_lock_taken_once_free_and_given_up_at_the_busy_timeout(tmp_path: Path) -> None:
    db = tmp_path / "d.db"
    holder = open_connection(db)
    holder.execute("CREATE TABLE t(v)")
    node = open_connection(db)
    node.execute("PRAGMA busy_timeout = 300")
    holder.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"), write_transaction(node):
        pass
    assert node.execute("PRAGMA busy_timeout").fetchone()[0] == 300  # the setting is kept
    assert not node.in_transaction

    node.execute("PRAGMA busy_timeout = 60000")
    released = threading.Event()

    def release() -> None:
        released.wait(30)
        holder.execute("COMMIT")

    threading.Thread(target=release).start()
    released.set()  # the lock is freed while the node waits for it (or before)
    with write_transaction(node):
        node.execute("INSERT INTO t VALUES (1)")
    assert node.execute("SELECT count(*) FROM t").fetchone()[0] == 1
    assert node.execute("PRAGMA busy_timeout").fetchone()[0] == 60000
    node.close()
    holder.close()
