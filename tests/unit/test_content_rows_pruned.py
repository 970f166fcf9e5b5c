"""A table without a primary key: this node's own change to a row's content, published and
pruned from the change log before it comes back, still accounts for a removal of that content
that another node's earlier change makes (real SQLite, capture triggers, row reader, applier)."""

from __future__ import annotations

from pathlib import Path

from harmonylite.cdc import changelog
from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import encode
from harmonylite.replication.own_returns import OwnReturns

COLUMNS = ("origin", "n", "v")
SHAPES = {"events": TableShape("events", COLUMNS, COLUMNS, content_keyed=True)}


def test_an_own_change_pruned_before_it_is_back_still_keeps_its_row(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "node2.db")
    conn.execute("CREATE TABLE events(origin INTEGER, n INTEGER, v)")
    install(conn)
    returns = OwnReturns()
    applier = Applier(origin="2:e2", returns=returns)
    # Node 1's row arrives.
    applier.apply(conn, "s-1", [(1, encode(1, [Change(1, "events", 1, (1, 1, None))], SHAPES,
                                             False, "e1"))])
    # This node sets it to what it holds (captured as the row removed and added), publishes it
    # and prunes its log, as housekeeping does, before anything else arrives.
    conn.execute("UPDATE events SET v = NULL WHERE origin = 1 AND n = 1")
    conn.execute("INSERT INTO events VALUES (2, 1, 'y')")  # and writes another row after it
    changes, shapes = read_changes(conn, changelog.watermark(conn), 100)
    mine = encode(2, changes, shapes, False, "e2")
    changelog.mark_published(conn, changes[-1].id)
    returns.sent("s-1", changes[-1].id)  # as the publisher notes an acknowledgement
    changelog.prune(conn, returns.floor())
    # Node 1's change of the row reached the stream first: the row removed, its new one added.
    theirs = encode(1, [Change(2, "events", 3, (1, 1, None)), Change(3, "events", 1, (1, 1, "x"))],
                    SHAPES, False, "e1")
    applier.apply(conn, "s-1", [(2, theirs)])
    applier.apply(conn, "s-1", [(3, mine)])
    # In stream order: node 1 removes the row and adds its own, node 2's removal finds nothing
    # and its row is added. Node 2 ends as every node does.
    assert sorted(conn.execute("SELECT * FROM events").fetchall(), key=repr) == sorted(
        [(1, 1, None), (1, 1, "x"), (2, 1, "y")], key=repr)
    conn.close()
