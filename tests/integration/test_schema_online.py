"""Schema changes while the nodes run: no restart, no lost column, no broken application DDL.

Every test keeps its nodes running throughout; real tools where they are the cause
(sqlite-utils ``transform``, ``add-column`` and ``insert``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

BOOKS = "CREATE TABLE books(id INTEGER PRIMARY KEY, title TEXT, author TEXT)"
SQLITE_UTILS = str(Path(sys.executable).parent / "sqlite-utils")


@pytest.fixture
def pair(tmp_path: Path, nats_server: NatsServer) -> Iterator[tuple[NodeProc, NodeProc]]:
    nodes = []
    for i in (1, 2):
        n = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [nats_server.url]},
                                                "cleanup_interval": 300})
        n.execute(BOOKS)
        nodes.append(n.start())
    yield nodes[0], nodes[1]
    for n in nodes:
        n.stop()


def rows(n: NodeProc, sql: str = "SELECT * FROM books ORDER BY id") -> list[tuple[Any, ...]]:
    return n.query(sql)


def cli(n: NodeProc, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(n.config_path),
                           *args], capture_output=True, text=True, timeout=60)


def test_add_column_while_running_rolling_upgrade(pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO books VALUES (1, 'Dune', 'Herbert')")
    wait_until(lambda: len(rows(b)) == 1, 20, "the first row")
    # node 1 migrates first (sqlite-utils add-column), then writes the new column
    subprocess.run([SQLITE_UTILS, "add-column", str(a.db), "books", "isbn", "text"], check=True)
    a.execute("UPDATE books SET isbn = '978-0441' WHERE id = 1")
    a.execute("INSERT INTO books VALUES (2, 'Emma', 'Austen', '978-0141')")
    # node 2 has not migrated: the changes wait for it, in order, visibly
    wait_until(lambda: json.loads(cli(b, "schema", "status", "--json").stdout)["parked"]
               .get("books", 0) >= 1, 20, "parked changes on node 2")
    assert rows(b) == [(1, "Dune", "Herbert")]
    status = cli(b, "-schema-status-cluster")
    assert status.returncode == 0 and "* books" in status.stdout, status.stdout + status.stderr
    # node 2 migrates: everything arrives, nothing dropped, no restart
    b.execute("ALTER TABLE books ADD COLUMN isbn TEXT")
    wait_until(lambda: rows(b) == rows(a), 20, "node 2 to catch up after its migration")
    assert rows(b) == [(1, "Dune", "Herbert", "978-0441"), (2, "Emma", "Austen", "978-0141")]
    wait_until(lambda: json.loads(cli(b, "schema", "status", "--json").stdout)["parked"] == {},
               20, "no parked changes")
    b.execute("UPDATE books SET isbn = 'from node 2' WHERE id = 2")
    wait_until(lambda: rows(a) == rows(b), 20, "node 2's write of the new column")


def test_rename_column_keeps_the_values(pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("ALTER TABLE books RENAME COLUMN author TO writer")
    a.execute("INSERT INTO books VALUES (1, 'Dune', 'Herbert')")
    b.execute("ALTER TABLE books RENAME COLUMN author TO writer")
    wait_until(lambda: rows(b) == [(1, "Dune", "Herbert")], 20, "the renamed column's value")
    b.execute("UPDATE books SET writer = 'F. Herbert'")
    wait_until(lambda: rows(a) == [(1, "Dune", "F. Herbert")], 20, "back to node 1")


def test_table_created_and_filled_at_once_on_a_running_node(
        pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    conn = a.connect()
    conn.executescript("CREATE TABLE late(id INTEGER PRIMARY KEY, v TEXT);"
                       "INSERT INTO late VALUES (1, 'first, before any trigger existed');")
    conn.close()
    subprocess.run([SQLITE_UTILS, "insert", str(a.db), "fresh", "-", "--pk", "id"],
                   input='[{"id": 1, "name": "made by sqlite-utils"}]', text=True, check=True)
    a.execute("INSERT INTO late VALUES (2, 'second')")
    b.execute("CREATE TABLE late(id INTEGER PRIMARY KEY, v TEXT)")
    wait_until(lambda: len(rows(b, "SELECT * FROM late")) == 2, 20, "rows of the new table")
    assert rows(b, "SELECT * FROM late ORDER BY id") == rows(a, "SELECT * FROM late ORDER BY id")
    b.execute("CREATE TABLE fresh(id INTEGER PRIMARY KEY, name TEXT)")
    wait_until(lambda: rows(b, "SELECT * FROM fresh") == [(1, "made by sqlite-utils")], 20,
               "the sqlite-utils table")


def test_table_rebuild_keeps_capture(pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO books VALUES (1, 'Dune', 'Herbert')")
    wait_until(lambda: len(rows(b)) == 1, 20, "the first row")
    # create new, copy, drop old, rename (what Django and Alembic batch mode do too)
    subprocess.run([SQLITE_UTILS, "transform", str(a.db), "books", "--rename", "title",
                    "name"], check=True)
    subprocess.run([SQLITE_UTILS, "transform", str(b.db), "books", "--rename", "title",
                    "name"], check=True)
    a.execute("INSERT INTO books VALUES (2, 'Emma', 'Austen')")
    a.execute("UPDATE books SET author = 'Frank Herbert' WHERE id = 1")
    wait_until(lambda: rows(b) == rows(a), 20, "node 1's writes after its rebuild")
    b.execute("UPDATE books SET name = 'Dune Messiah', author = 'F. H.' WHERE id = 1")
    wait_until(lambda: rows(a)[0] == (1, "Dune Messiah", "F. H."), 20, "a peer's whole update")


def test_drop_column_by_the_application_succeeds(pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO books VALUES (1, 'Dune', 'Herbert')")
    a.execute("ALTER TABLE books DROP COLUMN author")  # raised "no such column" before
    b.execute("ALTER TABLE books DROP COLUMN author")
    a.execute("INSERT INTO books VALUES (2, 'Emma')")
    wait_until(lambda: rows(b) == [(1, "Dune"), (2, "Emma")], 20, "rows after the drop")


def test_pending_changes_survive_stop_alter_restart(tmp_path: Path,
                                                    nats_server: NatsServer) -> None:
    nodes = []
    for i in (1, 2):
        n = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [nats_server.url]}})
        n.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a TEXT, b TEXT NOT NULL, c TEXT)")
        nodes.append(n.start())
    a, b = nodes
    a.stop()
    a.execute("INSERT INTO t VALUES (1, 'a1', 'b1', 'c1')")  # captured, not yet published
    a.execute("ALTER TABLE t DROP COLUMN a")
    b.execute("ALTER TABLE t DROP COLUMN a")
    a.start()
    wait_until(lambda: rows(b, "SELECT * FROM t") == [(1, "b1", "c1")], 20, "the pending row")
    assert b.query("SELECT count(*) FROM __harmonylite__dead_letter") == [(0,)]
