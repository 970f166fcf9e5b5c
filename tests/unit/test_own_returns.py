"""What the change log must keep: this node's changes still on their way back from a stream."""

from __future__ import annotations

from pathlib import Path

from harmonylite.cdc import changelog
from harmonylite.cdc.install import install
from harmonylite.db.connection import open_connection
from harmonylite.replication.own_returns import OwnReturns


def test_the_floor_is_the_lowest_change_not_back_on_any_stream() -> None:
    r = OwnReturns()
    assert r.floor() is None  # nothing sent
    r.sent("s-1", 10)
    r.sent("s-2", 7)
    assert r.floor() == 1
    r.came_back("s-1", 10)  # every change sent on s-1 is back
    assert r.floor() == 1  # s-2's are not
    r.came_back("s-2", 4)
    assert r.floor() == 5
    r.came_back("s-2", 7)
    assert r.floor() is None
    r.came_back("s-2", 3)  # a mark never goes back
    r.sent("s-1", 12)
    assert r.floor() == 11
    r.back_everywhere(12)  # past a shard-count change
    assert r.floor() is None


def test_prune_keeps_what_is_not_back(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "db.sqlite")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v)")
    install(conn)
    for i in range(6):
        conn.execute("INSERT INTO t VALUES (?, 'x')", (i,))
    ids = [r[0] for r in conn.execute("SELECT id FROM __harmonylite__log ORDER BY id")]
    changelog.mark_published(conn, ids[-1])

    def left() -> list[int]:
        return [r[0] for r in conn.execute("SELECT id FROM __harmonylite__log ORDER BY id")]
    changelog.prune(conn, keep_from=ids[3])
    assert left() == ids[3:]
    changelog.prune(conn, keep_from=None)
    assert left() == ids[-1:]  # the newest published row keeps ids increasing
    conn.close()
