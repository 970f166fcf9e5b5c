"""A node joining with a database of its own (rows, no sequence map, no stream positions) while
the cluster has a snapshot: it refuses unless the operator chose ``replace`` or ``merge``.

Real nodes, a real nats-server and a file store, as in test_recovery.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from test_recovery import (
    PAUSE_ENV,
    SCHEMA,
    Cluster,
    db_digest,
    items,
    node_cfg,
    save_snapshot,
    write,
)

from nodes import NodeProc, wait_until

pytest_plugins = ["test_recovery"]  # the ``cluster`` fixture

NOTES = "CREATE TABLE notes(id INTEGER PRIMARY KEY, t TEXT)"
# The joiner's own rows: id 5 is in the cluster's snapshot too, the others are not.
OWN = [(5, "joiner 5"), (101, "joiner 101"), (102, "joiner 102"), (103, "joiner 103")]


def joiner(cluster: Cluster, node_id: int, join: str | None = None, args: tuple[str, ...] = (),
           notes: bool = False, rows: bool = True) -> NodeProc:
    """A node whose database never ran harmonylite: the cluster's table, with rows of its own."""
    cfg: dict[str, Any] = node_cfg(cluster.server, cluster.store)
    if join is not None:
        cfg["snapshot"]["join"] = join
    n = NodeProc(cluster.tmp / f"node{node_id}", node_id, cfg, extra_args=list(args))
    conn = sqlite3.connect(n.db, isolation_level=None)
    try:
        conn.execute(SCHEMA)
        if rows:
            conn.executemany("INSERT INTO items VALUES (?, ?)", OWN)
        if notes:
            conn.execute(NOTES)
            conn.executemany("INSERT INTO notes VALUES (?, ?)", [(1, "a"), (2, "b")])
    finally:
        conn.close()
    cluster.nodes.append(n)
    return n


def copies(n: NodeProc) -> list[Path]:
    return sorted(n.dir.glob("data.db.before-join-*"))


def rows_of(path: Path, table: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(f"SELECT * FROM {table} ORDER BY 1").fetchall()
    finally:
        conn.close()


def exit_code(n: NodeProc, timeout: float = 120) -> int:
    n.start_async()
    assert n.proc is not None
    code = n.proc.wait(timeout)
    n.proc = None
    return code


def seeded(cluster: Cluster) -> tuple[NodeProc, str]:
    """Node 1 with rows 1..20 and a snapshot of them."""
    a = cluster.node(1).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(a)) == 20, 20, "a's rows")
    return a, save_snapshot(a)


def test_joiner_with_rows_of_its_own_refuses_and_leaves_its_database(cluster: Cluster) -> None:
    _, snap = seeded(cluster)
    j = joiner(cluster, 3, notes=True)
    files = sorted(p.name for p in j.dir.iterdir())
    before = db_digest(j.db)
    assert exit_code(j) == 2
    text = j.log_text()
    assert f"database {j.db} holds rows of its own (items: 4 rows, notes: 2 rows)" in text
    assert snap in text
    assert 'join = "replace"' in text and "-join replace" in text
    assert 'join = "merge"' in text and "-join merge" in text
    assert "the database was left untouched" in text
    assert "Snapshot restored" not in text
    assert db_digest(j.db) == before
    assert sorted(p.name for p in j.dir.iterdir()) == sorted([*files, "node.log"])


def test_joiner_chooses_replace_on_the_command_line(cluster: Cluster) -> None:
    a, snap = seeded(cluster)
    j = joiner(cluster, 3, args=("-join", "replace"), notes=True)
    old_items, old_notes = rows_of(j.db, "items"), rows_of(j.db, "notes")
    j.start()
    text = j.log_text()
    assert f"Snapshot restored {snap}" in text
    [copy] = copies(j)
    assert str(copy) in text
    assert rows_of(copy, "items") == old_items and rows_of(copy, "notes") == old_notes
    assert rows_of(copy, "sqlite_master WHERE name LIKE '__harmonylite__%'") == []
    assert sqlite3.connect(copy).execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    write(a, range(21, 26))
    wait_until(lambda: items(j) == items(a) and len(items(a)) == 25, 30, "j to converge")
    assert j.query("SELECT count(*) FROM sqlite_master WHERE name = 'notes'") == [(0,)]


def test_joiner_chooses_merge_in_the_config(cluster: Cluster) -> None:
    a, snap = seeded(cluster)
    b = cluster.node(2).start()
    wait_until(lambda: len(items(b)) == 20, 30, "b to replicate")
    write(a, range(21, 26))  # after the snapshot: replayed over it on the joiner
    j = joiner(cluster, 3, join="merge")
    old = rows_of(j.db, "items")
    j.start()
    text = j.log_text()
    assert f"Snapshot restored {snap}" in text
    [copy] = copies(j)
    assert rows_of(copy, "items") == old
    assert "merged 4 rows" in text and str(copy) in text
    # The joiner's write is the later one: its row 5 wins on every node.
    want = sorted({**{i: f"row {i}" for i in range(1, 26)}, **dict(OWN)}.items())
    for n in (a, b, j):
        wait_until(lambda n=n: items(n) == want, 30, f"node {n.node_id} to hold every row")
    write(a, range(26, 31))
    for n in (b, j):
        wait_until(lambda n=n: items(n) == items(a) and len(items(a)) == 33, 30,
                   f"node {n.node_id} to converge")
    assert not (j.dir / "data.db.join-merge").exists()


def test_empty_database_is_provisioned_without_a_question(cluster: Cluster) -> None:
    _, snap = seeded(cluster)
    j = joiner(cluster, 3, rows=False).start()
    assert f"Snapshot restored {snap}" in j.log_text()
    assert copies(j) == []
    assert len(items(j)) == 20


def test_rows_the_snapshot_holds_too_are_not_its_own(cluster: Cluster) -> None:
    """Nodes that all start with the same data (HarmonyLite's example cluster): the first one's
    snapshot holds every row of the others, so they are provisioned with no question."""
    _, snap = seeded(cluster)
    j = joiner(cluster, 3, rows=False)
    write(j, range(1, 6))
    j.start()
    text = j.log_text()
    assert f"holds only rows that snapshot {snap} holds too" in text
    assert f"Snapshot restored {snap}" in text
    assert copies(j) == [] and len(items(j)) == 20


def test_rows_of_its_own_without_a_snapshot_start_and_stay_local(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    write(a, range(1, 4))
    j = joiner(cluster, 3).start()
    text = j.log_text()
    assert "no snapshot in the store" in text
    assert "keeps its 4 rows (items: 4 rows), no snapshot installed" in text
    assert "those rows are not published" in text
    wait_until(lambda: len(items(j)) == 7, 30, "j to replay the stream")
    assert [r[0] for r in items(a)] == [1, 2, 3]
    assert copies(j) == []


def test_merge_without_a_snapshot_publishes_the_rows(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    write(a, range(1, 4))
    j = joiner(cluster, 3, join="merge").start()
    assert "merged 4 rows" in j.log_text()
    want = sorted({**{i: f"row {i}" for i in range(1, 4)}, **dict(OWN)}.items())
    for n in (a, j):
        wait_until(lambda n=n: items(n) == want, 30, f"node {n.node_id} to hold every row")


@pytest.mark.parametrize("where", ["config", "flag"])
def test_a_bad_join_value_is_a_usage_error(tmp_path: Path, where: str) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'db_path = "{tmp_path / "data.db"}"\n'
                      + ('[snapshot]\njoin = "maybe"\n' if where == "config" else ""))
    args = ["-join", "maybe"] if where == "flag" else []
    res = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(config), *args,
                          "snapshot", "list"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    key = "snapshot.join" if where == "config" else "-join"
    assert f"invalid configuration {key} = 'maybe': must be one of refuse, replace, merge" \
        in res.stderr


def test_merge_survives_a_kill_after_the_install(cluster: Cluster,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    a, snap = seeded(cluster)
    j = joiner(cluster, 3, join="merge")
    marker = j.dir / "paused"
    monkeypatch.setenv(PAUSE_ENV, f"after:{marker}")
    j.start_async()
    monkeypatch.delenv(PAUSE_ENV)
    wait_until(marker.exists, 60, "the install to pause")
    j.kill()  # the snapshot is installed, its rows not merged yet
    assert (j.dir / "data.db.join-merge").exists()
    assert [r[0] for r in items(j)] == list(range(1, 21))
    mark = len(j.log_text())
    j.start()
    text = j.log_text()[mark:]
    assert f"Snapshot restored {snap}" in text and "merged 4 rows" in text
    [copy] = copies(j)
    want = sorted({**{i: f"row {i}" for i in range(1, 21)}, **dict(OWN)}.items())
    for n in (a, j):
        wait_until(lambda n=n: items(n) == want, 30, f"node {n.node_id} to hold every row")
    assert not (j.dir / "data.db.join-merge").exists()
    assert rows_of(copy, "items") == sorted(OWN)
