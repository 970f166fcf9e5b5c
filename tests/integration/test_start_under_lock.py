"""A node started while the application holds the database's write lock longer than SQLite's
busy timeout waits for it instead of exiting. Real node processes and a real nats-server."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from nodes import NodeProc, wait_until
from servers import NatsServer

HOLD_SECONDS = 13.0  # the node's busy timeout is 10 s


def test_a_node_started_while_the_write_lock_is_held_waits_and_starts(
        tmp_path: Path, nats_server: NatsServer) -> None:
    cfg = {"nats": {"urls": [nats_server.url]}}
    a = NodeProc(tmp_path / "a", 1, cfg)
    a.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)")
    a.start()
    a.execute("INSERT INTO items VALUES (1, 'before')")
    a.stop()
    app = sqlite3.connect(a.db, isolation_level=None, timeout=10)
    app.execute("BEGIN IMMEDIATE")  # the application holds the write lock
    app.execute("INSERT INTO items VALUES (2, 'held')")
    released = threading.Event()
    try:
        mark = len(a.log_text())
        a.start_async()
        # The node reaches the lock (its start may be slow on a busy machine), then the lock
        # stays held longer than the busy timeout: a start that gives up after one timeout has
        # exited by then.
        wait_until(lambda: "waiting for the write lock" in a.log_text()[mark:], 60,
                   "the node to wait for the write lock")
        released.wait(HOLD_SECONDS)  # the rest of the application's transaction
        assert a.proc is not None and a.proc.poll() is None, a.log_text()[mark:]
        app.execute("COMMIT")
    finally:
        if app.in_transaction:
            app.execute("ROLLBACK")
        app.close()
    a.wait_started(60)
    text = a.log_text()[mark:]
    assert "waiting for the write lock" in text, text
    a.execute("INSERT INTO items VALUES (3, 'after')")
    b = NodeProc(tmp_path / "b", 2, cfg)
    b.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)")
    b.start()
    wait_until(lambda: [r[0] for r in b.query("SELECT id FROM items ORDER BY id")] == [1, 2, 3],
               60, "node b to get every row")
    a.stop()
    b.stop()
