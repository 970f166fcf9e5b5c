"""A node's own changes coming back from the stream, while the application keeps writing the same
rows: the echo of an older change must never take a row back, or an application that reads and
writes (``n = n + 1``) builds on the old value and loses its own updates."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from nodes import NodeProc, wait_until
from servers import NatsServer

ROWS = 2
ROUNDS = 1500
SEQS = "SELECT stream, seq FROM __harmonylite__seq ORDER BY stream"


def _nodes(tmp_path: Path, server: NatsServer) -> list[NodeProc]:
    nodes = []
    for i in (1, 2):
        node = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [server.url]}})
        node.execute("CREATE TABLE counters(id INTEGER PRIMARY KEY, n INTEGER NOT NULL, "
                     "note TEXT)")
        nodes.append(node)
    return nodes


def _increment(node: NodeProc, rows: range, rounds: int) -> None:
    conn = node.connect()
    try:
        for r in range(rounds):
            for i in rows:
                conn.execute("UPDATE counters SET n = n + 1, note = ? WHERE id = ?",
                             (f"{node.node_id}:{r}", i))
            if r % 5 == 0:
                # Not a synchronisation: a pause lets the node publish while the application
                # goes on writing, so echoes come back between the application's updates.
                time.sleep(0.0005)
    finally:
        conn.close()


def _values(node: NodeProc) -> list[tuple[int, int, str | None]]:
    return [(int(a), int(b), c) for a, b, c in
            node.query("SELECT id, n, note FROM counters ORDER BY id")]


def test_own_echo_never_takes_back_newer_local_changes(tmp_path: Path,
                                                       nats_server: NatsServer) -> None:
    nodes = _nodes(tmp_path, nats_server)
    n1, n2 = nodes
    for n in nodes:
        n.start()
    try:
        n1.execute("INSERT INTO counters(id, n) VALUES " +
                   ", ".join(f"({i}, 0)" for i in range(2 * ROWS)))
        wait_until(lambda: len(_values(n2)) == 2 * ROWS, 30, "the rows on node 2")
        # One writer per row at a time, many updates per row in flight: each node increments
        # its own rows as fast as it can while the echoes of its earlier increments come back.
        threads = [threading.Thread(target=_increment, args=(n1, range(0, ROWS), ROUNDS)),
                   threading.Thread(target=_increment, args=(n2, range(ROWS, 2 * ROWS), ROUNDS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        expected = [(i, ROUNDS, f"{1 if i < ROWS else 2}:{ROUNDS - 1}")
                    for i in range(2 * ROWS)]
        try:
            wait_until(lambda: _values(n1) == _values(n2) == expected, 30,
                       "both nodes to hold every increment")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: node 1 {_values(n1)}, node 2 {_values(n2)}") from None
        # Then the same rows from the other node: node 2 continues node 1's counters.
        _increment(n2, range(0, ROWS), ROUNDS)
        _increment(n1, range(ROWS, 2 * ROWS), ROUNDS)
        expected = [(i, 2 * ROUNDS, f"{2 if i < ROWS else 1}:{ROUNDS - 1}")
                    for i in range(2 * ROWS)]
        try:
            wait_until(lambda: _values(n1) == _values(n2) == expected, 30,
                       "both nodes to hold every increment of the second round")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: node 1 {_values(n1)}, node 2 {_values(n2)}") from None
        wait_until(lambda: n1.query(SEQS) == n2.query(SEQS), 30, "both nodes at the stream's end")
    finally:
        for n in nodes:
            n.stop()
    # Positions of groups that wrote nothing else wait in memory; a stop writes them.
    assert n1.query(SEQS) == n2.query(SEQS)


def test_same_rows_incremented_on_two_nodes_at_once_converge(tmp_path: Path,
                                                             nats_server: NatsServer) -> None:
    """Both nodes increment the same rows at once: full-row changes keep the stream's last
    write, so increments from the two nodes may overwrite each other, but both nodes end on
    the same values."""
    nodes = _nodes(tmp_path, nats_server)
    n1, n2 = nodes
    for n in nodes:
        n.start()
    try:
        n1.execute("INSERT INTO counters(id, n) VALUES " +
                   ", ".join(f"({i}, 0)" for i in range(ROWS)))
        wait_until(lambda: len(_values(n2)) == ROWS, 30, "the rows on node 2")
        threads = [threading.Thread(target=_increment, args=(n, range(ROWS), ROUNDS))
                   for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        def settled() -> bool:
            a, b = _values(n1), _values(n2)
            return a == b and not n1.query("SELECT 1 FROM __harmonylite__log WHERE id > "
                                           "(SELECT v FROM __harmonylite__state "
                                           "WHERE k = 'published')")
        wait_until(settled, 60, "both nodes to end identical")
    finally:
        for n in nodes:
            n.stop()
