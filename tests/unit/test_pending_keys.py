"""Which of this node's own changes the applier knows of, when the publisher got there first."""

from __future__ import annotations

from pathlib import Path

from harmonylite.cdc import changelog
from harmonylite.cdc.install import install
from harmonylite.db.connection import open_connection


def test_changes_published_before_the_applier_looked_are_still_known_unless_pruned(
    tmp_path: Path,
) -> None:
    """The publisher sends a burst before the first of it comes back (so before the applier
    reads the log again): the changes still in the log are known one by one, so their coming
    back is decided without asking the log again. Only pruned ones make the range blind."""
    conn = open_connection(tmp_path / "d.db")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    install(conn)
    shapes = changelog.registry(conn)
    pending = changelog.PendingKeys()
    pending.refresh(conn, shapes)  # first look: nothing captured yet
    assert pending.blind_upto == 0
    for i in range(10):
        conn.execute("INSERT INTO t VALUES (?, 'x')", (i,))
    changelog.mark_published(conn, 10)  # the burst went out before the applier looked
    pending.refresh(conn, shapes)
    assert pending.blind_upto == 0
    assert [pending.newest_own(("t", (i,))) for i in range(10)] == list(range(1, 11))

    for i in range(10, 20):
        conn.execute("INSERT INTO t VALUES (?, 'x')", (i,))
    changelog.mark_published(conn, 20)
    assert changelog.prune(conn) == 19  # ids 1..19 gone, 11..19 before the applier saw them
    pending.refresh(conn, shapes)
    assert pending.blind_upto == 19
    assert pending.newest_own(("t", (19,))) == 20
    conn.close()
