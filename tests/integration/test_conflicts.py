"""Conflicts converge: UNIQUE values, REPLACE, application triggers and awkward keys end
identical on every node (three real nodes, two shards, real nats-server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = """
CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, name TEXT);
CREATE TABLE other(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE handles(id INTEGER PRIMARY KEY, handle TEXT UNIQUE);
CREATE TABLE notes(id INTEGER PRIMARY KEY, body TEXT, updated_at TEXT);
CREATE TABLE audit(note_id INTEGER, what TEXT, PRIMARY KEY (note_id, what));
CREATE TRIGGER notes_audit AFTER INSERT ON notes BEGIN
  INSERT INTO audit(note_id, what) VALUES (NEW.id, 'created'); END;
CREATE TRIGGER notes_touch AFTER UPDATE OF body ON notes BEGIN
  UPDATE notes SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') WHERE id = NEW.id; END;
CREATE TABLE tags(name TEXT PRIMARY KEY, n INTEGER);
CREATE TABLE words(w TEXT PRIMARY KEY COLLATE NOCASE, n INTEGER);
CREATE TABLE loose(a TEXT, b INTEGER)
"""
TABLES = ["users", "other", "handles", "notes", "audit", "tags", "words", "loose"]


def _start_trio(tmp_path: Path, server: NatsServer, **extra: Any) -> list[NodeProc]:
    nodes = []
    for i in (1, 2, 3):
        n = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [server.url]},
                                                "replication_log": {"shards": 2}, **extra})
        conn = n.connect()
        conn.executescript(SCHEMA)
        conn.close()
        nodes.append(n.start())
    return nodes


@pytest.fixture
def trio(tmp_path: Path, nats_server: NatsServer) -> Iterator[list[NodeProc]]:
    nodes = _start_trio(tmp_path, nats_server)
    yield nodes
    for n in nodes:
        n.stop()


@pytest.fixture
def trio_pruning(tmp_path: Path, nats_server: NatsServer) -> Iterator[list[NodeProc]]:
    """Three nodes that prune their change logs every millisecond: a published change leaves
    the log long before it comes back from the stream."""
    nodes = _start_trio(tmp_path, nats_server, cleanup_interval=1)
    yield nodes
    for n in nodes:
        n.stop()


def dump(n: NodeProc, table: str) -> list[tuple[Any, ...]]:
    cols = [c[1] for c in n.query(f'PRAGMA table_info("{table}")')]
    exprs = ", ".join(f'typeof("{c}"), quote("{c}")' for c in cols)
    return sorted(n.query(f'SELECT {exprs} FROM "{table}"'), key=repr)


def converged(nodes: list[NodeProc], tables: list[str] = TABLES) -> bool:
    return all(dump(n, t) == dump(nodes[0], t) for t in tables for n in nodes[1:])


def stream_heads(url: str) -> dict[str, int]:
    """Each change stream's last sequence on the server."""
    async def ask() -> dict[str, int]:
        nc = await nats.connect(url)
        try:
            js = nc.jetstream()
            return {i.config.name: int(i.state.last_seq) for i in await js.streams_info()
                    if i.config.name and i.config.name.startswith("harmonylite-changes-")}
        finally:
            await nc.close()
    return asyncio.run(ask())


def settled(nodes: list[NodeProc]) -> Callable[[], bool]:
    """Nothing left to publish anywhere, every published message applied on every node, and
    the same rows everywhere. (Without the second, nodes can agree for a moment on a state that
    a message already stored but not yet applied changes again.)"""
    def check() -> bool:
        pending = sum(n.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                              "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0]
                      for n in nodes)
        if pending:
            return False
        heads = stream_heads(tomllib.loads(nodes[0].config_path.read_text())["nats"]["urls"][0])
        for n in nodes:
            applied = dict(n.query("SELECT stream, seq FROM __harmonylite__seq"))
            if any(applied.get(s, 0) < last for s, last in heads.items()):
                return False
        return converged(nodes)
    return check


def at_once(*writes: Callable[[], None]) -> None:
    barrier = threading.Barrier(len(writes))

    def go(w: Callable[[], None]) -> None:
        barrier.wait()
        w()
    threads = [threading.Thread(target=go, args=(w,)) for w in writes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_same_unique_value_on_two_nodes_at_once(trio: list[NodeProc]) -> None:
    a, b, c = trio

    def txn(n: NodeProc, uid: int, base: int) -> Callable[[], None]:
        def run() -> None:
            conn = n.connect()
            with conn:
                conn.execute("BEGIN")
                conn.executemany("INSERT INTO other VALUES (?, 'x')",
                                 [(base + i,) for i in range(30)])
                conn.execute("INSERT INTO users VALUES (?, 'same@example.com', ?)",
                             (uid, f"node {n.node_id}"))
                conn.execute("COMMIT")
            conn.close()
        return run

    at_once(txn(a, 5099, 1000), txn(b, 6099, 2000))
    wait_until(settled(trio), 30, "three nodes to converge")
    assert len(a.query("SELECT * FROM other")) == 60  # no unrelated row lost
    assert len(a.query("SELECT * FROM users")) == 1
    recorded = [n.query("SELECT count(*) FROM __harmonylite__conflicts")[0][0] for n in trio]
    assert any(recorded)  # the displaced row is kept where an operator finds it
    out = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(c.config_path),
                          "conflicts", "list", "--json"], capture_output=True, text=True,
                         timeout=60, check=True)
    listed = json.loads(out.stdout)
    assert all(x["table"] == "users" and x["displaced"]["email"] == "same@example.com"
               for x in listed)


def test_unique_handle_moved_between_rows_with_two_shards(trio: list[NodeProc]) -> None:
    a = trio[0]
    a.execute("INSERT INTO handles VALUES (1, 'alice')")
    a.execute("INSERT INTO handles VALUES (2, NULL)")
    for step in range(20):
        src, dst = (1, 2) if step % 2 == 0 else (2, 1)
        conn = a.connect()
        with conn:
            conn.execute("BEGIN")
            conn.execute("UPDATE handles SET handle = NULL WHERE id = ?", (src,))
            conn.execute("UPDATE handles SET handle = 'alice' WHERE id = ?", (dst,))
            conn.execute("COMMIT")
        conn.close()
    wait_until(settled(trio), 30, "converged")
    assert a.query("SELECT id, handle FROM handles ORDER BY id") == [(1, "alice"), (2, None)]
    assert all(n.query("SELECT count(*) FROM __harmonylite__dead_letter")[0][0] == 0
               for n in trio)


def test_unique_handle_moved_between_rows_while_the_log_is_pruned(
        trio_pruning: list[NodeProc]) -> None:
    """A value moved back and forth between two rows by one node's transactions, its changes
    pruned from its log once published: its own changes coming back late never take a row that
    its application changed again since (the application would find the row gone)."""
    a = trio_pruning[0]
    a.execute("INSERT INTO handles VALUES (1, 'alice')")
    a.execute("INSERT INTO handles VALUES (2, NULL)")
    moved = 0
    for step in range(40):
        src, dst = (1, 2) if step % 2 == 0 else (2, 1)
        conn = a.connect()
        with conn:
            conn.execute("BEGIN")
            moved += conn.execute("UPDATE handles SET handle = NULL WHERE id = ?",
                                  (src,)).rowcount
            moved += conn.execute("UPDATE handles SET handle = 'alice' WHERE id = ?",
                                  (dst,)).rowcount
            conn.execute("COMMIT")
        conn.close()
    assert moved == 80  # every update of the application found its row
    wait_until(settled(trio_pruning), 30, "converged")
    assert a.query("SELECT id, handle FROM handles ORDER BY id") == [(1, "alice"), (2, None)]
    assert all(n.query("SELECT count(*) FROM __harmonylite__conflicts")[0][0] == 0
               for n in trio_pruning)


@pytest.mark.parametrize("recursive", [False, True])
def test_insert_or_replace_displacing_a_row(trio: list[NodeProc], recursive: bool) -> None:
    a = trio[0]
    a.execute("INSERT INTO users VALUES (1, 'one@example.com', 'one')")
    a.execute("INSERT INTO users VALUES (2, 'two@example.com', 'two')")
    wait_until(settled(trio), 20, "first rows")
    conn = a.connect()
    conn.execute(f"PRAGMA recursive_triggers = {'ON' if recursive else 'OFF'}")
    conn.execute("INSERT OR REPLACE INTO users VALUES (3, 'two@example.com', 'three')")
    conn.close()
    wait_until(settled(trio), 20, "converged")
    assert a.query("SELECT id FROM users ORDER BY id") == [(1,), (3,)]


def test_application_triggers_fire_once_per_logical_write(trio: list[NodeProc]) -> None:
    a, b, _ = trio
    a.execute("INSERT INTO notes(id, body) VALUES (1, 'hello')")
    b.execute("INSERT INTO notes(id, body) VALUES (2, 'world')")
    a.execute("UPDATE notes SET body = 'hello again' WHERE id = 1")
    wait_until(settled(trio), 20, "converged")
    assert sorted(a.query("SELECT note_id, what FROM audit")) == [(1, "created"),
                                                                   (2, "created")]
    stamps = {n.query("SELECT updated_at FROM notes WHERE id = 1")[0] for n in trio}
    assert len(stamps) == 1 and None not in next(iter(stamps))
    # a migration recreating the trigger keeps it working the same way
    a.execute("DROP TRIGGER notes_audit")
    a.execute("CREATE TRIGGER notes_audit AFTER INSERT ON notes BEGIN "
              "INSERT INTO audit(note_id, what) VALUES (NEW.id, 'made'); END")
    wait_until(lambda: "WHEN" in a.query("SELECT sql FROM sqlite_master WHERE "
                                         "name = 'notes_audit'")[0][0], 20, "trigger wrapped")
    a.execute("INSERT INTO notes(id, body) VALUES (3, 'three')")
    wait_until(settled(trio), 20, "converged")
    assert len(b.query("SELECT * FROM audit")) == 3


def test_null_text_primary_key(trio: list[NodeProc]) -> None:
    a, b, _ = trio
    a.execute("INSERT INTO tags VALUES (NULL, 1)")
    a.execute("UPDATE tags SET n = 2 WHERE name IS NULL")
    wait_until(settled(trio), 20, "converged")
    assert a.query("SELECT name, n FROM tags") == [(None, 2)]
    b.execute("DELETE FROM tags WHERE name IS NULL")
    wait_until(lambda: a.query("SELECT count(*) FROM tags") == [(0,)], 20, "delete reached")
    wait_until(settled(trio), 20, "converged")


def test_nocase_key_written_in_two_cases_at_once(trio: list[NodeProc]) -> None:
    a, b, _ = trio
    at_once(lambda: a.execute("INSERT INTO words VALUES ('Key', 1)"),
            lambda: b.execute("INSERT INTO words VALUES ('KEY', 2)"))
    wait_until(settled(trio), 20, "converged")
    assert len(a.query("SELECT * FROM words")) == 1


def test_vacuum_on_a_table_without_primary_key(trio: list[NodeProc]) -> None:
    a, b, c = trio
    for i in range(20):
        a.execute("INSERT INTO loose VALUES (?, ?)", (f"r{i}", i))
    a.execute("INSERT INTO loose VALUES ('dup', 0)")
    a.execute("INSERT INTO loose VALUES ('dup', 0)")
    wait_until(settled(trio), 20, "first rows")
    a.execute("DELETE FROM loose WHERE b % 3 = 0 AND a != 'dup'")
    wait_until(settled(trio), 20, "deletes")
    for n in trio:
        n.execute("VACUUM")  # renumbers the rowids of a table without an INTEGER PRIMARY KEY
    b.execute("UPDATE loose SET b = b + 100 WHERE b % 2 = 1")
    c.execute("DELETE FROM loose WHERE rowid = (SELECT min(rowid) FROM loose WHERE a = 'dup')")
    wait_until(settled(trio), 20, "converged after VACUUM")
    assert sorted(a.query("SELECT a, b FROM loose")) == sorted(
        [(f"r{i}", i + 100 if i % 2 else i) for i in range(20) if i % 3] + [("dup", 0)])


def test_same_new_key_inserted_on_two_nodes_keeps_the_displaced_row(
        trio: list[NodeProc]) -> None:
    a, b, c = trio
    at_once(lambda: a.execute("INSERT INTO other VALUES (6, 'written on node 1')"),
            lambda: b.execute("INSERT INTO other VALUES (6, 'written on node 2')"))
    wait_until(settled(trio), 20, "converged")
    (final,) = a.query("SELECT v FROM other WHERE id = 6")
    loser = "written on node 2" if final[0] == "written on node 1" else "written on node 1"
    out = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(c.config_path),
                          "conflicts", "list", "--json"], capture_output=True, text=True,
                         timeout=60, check=True)
    assert [(x["table"], x["key"], x["displaced"]["v"]) for x in json.loads(out.stdout)] == [
        ("other", "[6]", loser)]
    for n in (a, b):  # every node that recorded it names the same loser
        recorded = n.query("SELECT tbl, key FROM __harmonylite__conflicts")
        assert recorded in ([], [("other", "[6]")])
    assert {tuple(n.query("SELECT v FROM other WHERE id = 6")) for n in trio} == {(final,)}


def test_migration_bookkeeping_tables_stay_per_node(tmp_path: Path,
                                                    nats_server: NatsServer) -> None:
    nodes = []
    for i in (1, 2):
        n = NodeProc(tmp_path / f"n{i}", i, {"nats": {"urls": [nats_server.url]}})
        conn = n.connect()
        conn.executescript("CREATE TABLE django_migrations(id INTEGER PRIMARY KEY, app TEXT, "
                           "name TEXT); CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)")
        conn.close()
        nodes.append(n.start())
    a, b = nodes
    a.execute("INSERT INTO django_migrations VALUES (1, 'library', '0002_isbn')")
    a.execute("INSERT INTO items VALUES (1, 'replicated')")
    wait_until(lambda: b.query("SELECT v FROM items") == [("replicated",)], 20, "items")
    assert b.query("SELECT * FROM django_migrations") == []
    assert "not replicated (exclude_tables / include_tables): django_migrations" in a.log_text()


def listed_conflicts(n: NodeProc) -> list[tuple[Any, ...]]:
    out = n.cli("conflicts", "list", "--json")
    assert out.returncode == 0, out.stderr
    return sorted((x["table"], x["key"], json.dumps(x["displaced"], sort_keys=True),
                   x["winning_origin"], x["winning_key"], x["stream"], x["sequence"])
                  for x in json.loads(out.stdout))


def test_every_node_records_the_same_unique_conflicts(trio: list[NodeProc]) -> None:
    """Five inserts of the same UNIQUE values on two nodes at once: every node's conflicts list
    names the same displaced rows and the same winners, and no surviving row as displaced."""
    a, b, _ = trio

    def inserts(n: NodeProc, base: int) -> Callable[[], None]:
        def run() -> None:
            conn = n.connect()
            try:
                for i in range(5):
                    conn.execute("INSERT INTO users VALUES (?, ?, ?)",
                                 (base + i, f"u{i}@example.com", f"node {n.node_id}"))
            finally:
                conn.close()
        return run

    at_once(inserts(a, 1000), inserts(b, 2000))
    wait_until(settled(trio), 30, "three nodes to converge")
    survivors = {str([r[0]]) for r in a.query("SELECT id FROM users")}
    assert len(survivors) == 5
    lists = [listed_conflicts(n) for n in trio]
    for n, found in zip(trio, lists, strict=True):
        shown = {x[1] for x in found}
        assert not shown & survivors, f"node {n.node_id} lists surviving rows as displaced: " \
            f"{sorted(shown & survivors)}"
    # A row displaced before its node published it (a local write losing to a UNIQUE value
    # that came in first) existed on that node only, and only that node can record it.
    shared = [[x for x in found if sum(x in other for other in lists) > 1
               or json.loads(x[2])["name"] != f"node {n.node_id}"]
              for n, found in zip(trio, lists, strict=True)]
    written = {str([base + i]) for base in (1000, 2000) for i in range(5)}
    assert {x[1] for found in lists for x in found} == written - survivors  # each one somewhere
    assert shared[1] == shared[0] and shared[2] == shared[0], "\n".join(
        f"node {n.node_id}: {found}" for n, found in zip(trio, lists, strict=True))
