"""Tables without a primary key (rows identified by their whole content) under concurrent writes:
real node processes, a real nats-server, real SQLite files."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE events(origin INTEGER, n INTEGER, v)"


def _nodes(tmp_path: Path, server: NatsServer) -> list[NodeProc]:
    nodes = []
    for i in (1, 2):
        cfg: dict[str, Any] = {"nats": {"urls": [server.url]}}
        node = NodeProc(tmp_path / f"node{i}", i, cfg)
        node.execute(SCHEMA)
        nodes.append(node)
    return nodes


def _rows(node: NodeProc) -> list[tuple[Any, ...]]:
    return sorted(node.query("SELECT origin, n, v FROM events"), key=repr)


def test_an_update_writing_the_same_content_beside_a_remote_update_keeps_both_rows(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Node 2 sets a row to what it already holds while node 1 changes the same row; node 1's
    change reaches the stream first. In stream order node 1 removes the row and adds its own,
    then node 2's removal finds nothing and its row is added: both rows, on every node. Node 2,
    which applies node 1's change after its own, must not let that removal take its row."""
    a, b = _nodes(tmp_path, nats_server)
    a.start()
    b.start()
    a.execute("INSERT INTO events VALUES (1, 1, NULL)")
    wait_until(lambda: _rows(b) == [(1, 1, None)], 30, "the row to reach node 2")
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)  # node 2's process is paused: its application is not
    try:
        b.execute("UPDATE events SET v = NULL WHERE origin = 1 AND n = 1")
        a.execute("UPDATE events SET v = 'x' WHERE origin = 1 AND n = 1")
        wait_until(lambda: a.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                                   "(SELECT v FROM __harmonylite__state WHERE k = 'published')"
                                   )[0][0] == 0, 30, "node 1's change to be published")
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    want = sorted([(1, 1, None), (1, 1, "x")], key=repr)
    wait_until(lambda: _rows(a) == want, 30, "node 2's row to reach node 1")
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                               "(SELECT v FROM __harmonylite__state WHERE k = 'published')"
                               )[0][0] == 0, 30, "node 2's change to be published")
    wait_until(lambda: _rows(b) == want, 30,
               f"node 2 to hold both rows (it holds {_rows(b)})")
    a.stop()
    b.stop()


def test_a_removal_takes_the_row_of_its_exact_content(
        tmp_path: Path, nats_server: NatsServer) -> None:
    """Rows that SQLite compares equal but that hold other values (``0`` and ``0.0``; ``'a'``
    and ``'A'`` in a NOCASE column) are different contents: a node removing one of them makes
    every node remove that one, whichever of them each node stored first."""
    a, b = _nodes(tmp_path, nats_server)
    for node in (a, b):
        node.execute("CREATE TABLE tags(name TEXT COLLATE NOCASE, n INTEGER)")
    a.start()
    b.start()
    a.execute("INSERT INTO events VALUES (1, 1, 0.0)")
    a.execute("INSERT INTO events VALUES (1, 1, 0)")
    a.execute("INSERT INTO tags VALUES ('A', 1)")
    a.execute("INSERT INTO tags VALUES ('a', 1)")
    both = sorted([(1, 1, 0.0), (1, 1, 0)], key=repr)
    wait_until(lambda: _rows(b) == both and len(b.query("SELECT 1 FROM tags")) == 2, 30,
               "the rows to reach node 2")
    b.execute("DELETE FROM events WHERE typeof(v) = 'integer'")
    b.execute("DELETE FROM tags WHERE name = 'a' COLLATE BINARY")

    def tags(node: NodeProc) -> list[tuple[Any, ...]]:
        return sorted(node.query("SELECT name, n FROM tags"))

    wait_until(lambda: len(a.query("SELECT 1 FROM tags")) == 1
               and len(_rows(a)) == 1, 30, "the removals to reach node 1")
    typed = "SELECT origin, n, v, typeof(v) FROM events"  # Python finds 0 == 0.0
    assert a.query(typed) == b.query(typed) == [(1, 1, 0.0, "real")]
    assert tags(a) == tags(b) == [("A", 1)]
    a.stop()
    b.stop()
