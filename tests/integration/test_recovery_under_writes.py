"""Restores while the application keeps writing, with real nodes, a real nats-server and a file
store (restarts under heavy writes and a short retention: test_snapshot_request.py)."""

from __future__ import annotations

import sqlite3
import threading

import pytest
from test_recovery import (
    PAUSE_ENV,
    Cluster,
    items,
    log_after,
    position,
    save_snapshot,
    stream_state,
    write,
)
from test_recovery_convergence import _triggers

from nodes import NodeProc, wait_until

pytest_plugins = ["test_recovery"]  # the ``cluster`` fixture


class Writer:
    """The application: inserts rows into ``items`` on one node at a steady rate, in a thread,
    and keeps the ids it committed (those must end up on every node)."""

    def __init__(self, node: NodeProc, first_id: int, per_second: float) -> None:
        self.node = node
        self.next_id = first_id
        self.pause = 1.0 / per_second
        self.committed: list[int] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn = self.node.connect()
        try:
            while not self.done.wait(self.pause):  # the rate, not a synchronisation
                i = self.next_id
                conn.execute("INSERT INTO items VALUES (?, ?)", (i, f"app {i}"))
                self.committed.append(i)
                self.next_id += 1
        except sqlite3.Error as exc:
            self.error = exc
        finally:
            conn.close()

    def stop(self) -> list[int]:
        self.done.set()
        self.thread.join(30)
        assert self.error is None, f"the application's write failed: {self.error}"
        return self.committed


def _ids(node: NodeProc) -> set[int]:
    return {int(r[0]) for r in items(node)}


def _behind_with_a_snapshot(cluster: Cluster, *, gap: bool = True
                            ) -> tuple[NodeProc, NodeProc, int]:
    """Nodes a and b; b stopped and due for a restore at its next start, from a snapshot taken
    on a: with ``gap``, the stream (50 messages) moved past b's position; else b's sequence map
    is removed (the seed's way to force a restore) and the stream keeps 1024 messages, so what b
    publishes during its restore never pushes the snapshot out of it. Returns a, b and the next
    free id."""
    log = {"shards": 1, "max_entries": 50 if gap else 1024}
    a = cluster.node(1, replication_log=log).start()
    b = cluster.node(2, replication_log=log).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 20, "b to replicate")
    b.stop()
    if gap:
        next_id = cluster.push_past(a, position(b), 21)
    else:
        write(a, range(21, 41))
        next_id = 41
        wait_until(lambda: position(a) == stream_state(cluster.server)[1], 20,
                   "a to apply its own messages")
        (b.dir / "seq-map.cbor").unlink()
    save_snapshot(a)
    return a, b, next_id


def test_a_row_written_right_after_the_install_is_captured(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """The application writes the moment the restored file is installed, before the node has
    gone any further: the restored file already carries capture, the row is published."""
    a, b, next_id = _behind_with_a_snapshot(cluster)
    marker = b.dir / "paused"
    monkeypatch.setenv(PAUSE_ENV, f"after:{marker}")
    b.start_async()
    monkeypatch.delenv(PAUSE_ENV)
    wait_until(marker.exists, 60, "the install to pause once committed")
    triggers = _triggers(b)
    write(b, range(1_000_000, 1_000_001))
    b.kill()  # the row must survive the next start's restore as well: it is a pending change
    assert triggers > 0, "the installed database has no capture triggers"
    b.start()
    wait_until(lambda: 1_000_000 in _ids(a) and items(b) == items(a), 30,
               "the row written on b to reach a, and the nodes to agree")
    assert _ids(a) == set(range(1, next_id)) | {1_000_000}


@pytest.mark.parametrize("per_second", [50, 200])
def test_rows_written_while_a_node_restores_reach_every_node(
        cluster: Cluster, per_second: int) -> None:
    """The application writes on b before, during and after its restore: at 50 rows/s a row
    could fall between the install and capture; at 200 rows/s (nonstop, from the install's
    point of view) the node used to refuse after 5 tries saying "bring NATS back".

    At 200 rows/s b restores because its sequence map is gone, with a stream long enough for
    what b publishes while its install waits for a quiet moment (a stream that drops the
    snapshot meanwhile leaves a gap, reported as such)."""
    a, b, next_id = _behind_with_a_snapshot(cluster, gap=per_second == 50)
    mark = len(b.log_text())
    app = Writer(b, 1_000_000, per_second)
    b.start(60)
    text = log_after(b, mark)
    assert "Snapshot restored" in text and "bring NATS back" not in text
    written = len(app.committed)
    wait_until(lambda: len(app.committed) >= written + per_second // 2, 20,
               "more writes on the started node")
    ours = app.stop()
    expected = set(range(1, next_id)) | set(ours)
    wait_until(lambda: _ids(a) == expected and items(b) == items(a), 30,
               "every row written on b to reach a, and the nodes to agree")
