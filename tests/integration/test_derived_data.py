"""Derived data kept by the application's own triggers (an FTS5 external-content index, a counter
table each node keeps for itself, an audit row) ends right on every node, including a node
provisioned from a snapshot; tables named like a virtual table's shadow tables are replicated.

Real nodes, a real nats-server, a file snapshot store.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

# As in SQLite's FTS5 documentation (external content tables), plus an audit trigger writing a
# replicated table and a per-node counter (doc_stats, excluded from replication).
SCHEMA = """
CREATE TABLE docs(id INTEGER PRIMARY KEY, body TEXT);
CREATE VIRTUAL TABLE docs_fts USING fts5(body, content='docs', content_rowid='id');
CREATE TRIGGER docs_ai AFTER INSERT ON docs BEGIN
  INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body);
END;
CREATE TRIGGER docs_ad AFTER DELETE ON docs BEGIN
  INSERT INTO docs_fts(docs_fts, rowid, body) VALUES('delete', old.id, old.body);
END;
CREATE TRIGGER docs_au AFTER UPDATE ON docs BEGIN
  INSERT INTO docs_fts(docs_fts, rowid, body) VALUES('delete', old.id, old.body);
  INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body);
END;
CREATE TABLE audit(id TEXT PRIMARY KEY, doc_id INTEGER, action TEXT);
CREATE TRIGGER docs_audit AFTER INSERT ON docs BEGIN
  INSERT INTO audit VALUES (lower(hex(randomblob(8))), new.id, 'insert');
END;
CREATE TABLE doc_stats(id INTEGER PRIMARY KEY CHECK (id = 1), n INTEGER NOT NULL);
INSERT INTO doc_stats VALUES (1, 0);
CREATE TRIGGER docs_count_ai AFTER INSERT ON docs BEGIN
  UPDATE doc_stats SET n = n + 1 WHERE id = 1;
END;
CREATE TRIGGER docs_count_ad AFTER DELETE ON docs BEGIN
  UPDATE doc_stats SET n = n - 1 WHERE id = 1;
END;
"""
GUARD = "__harmonylite__guard"


def node_cfg(server: NatsServer, store: Path | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "nats": {"urls": [server.url]},
        "replication_log": {"shards": 2},
        "exclude_tables": ["doc_stats"],
    }
    if store is not None:
        cfg["snapshot"] = {"enabled": True, "store": "file", "file": {"path": str(store)},
                           "interval": 0, "leader_ttl": 3_600_000}
    return cfg


def make_node(tmp: Path, node_id: int, cfg: dict[str, Any], schema: str | None) -> NodeProc:
    n = NodeProc(tmp / f"node{node_id}", node_id, cfg)
    if schema is not None:
        conn = n.connect()
        conn.executescript(schema)
        conn.close()
    return n


def match(n: NodeProc, word: str) -> list[int]:
    return [r[0] for r in n.query("SELECT rowid FROM docs_fts WHERE docs_fts MATCH ? "
                                  "ORDER BY rowid", (word,))]


def fts_integrity(n: NodeProc) -> str | None:
    """None when FTS5's integrity-check passes, else its error. (With rank 1 it also compares
    the index with the external content table.)"""
    try:
        n.execute("INSERT INTO docs_fts(docs_fts) VALUES('integrity-check')")
        n.execute("INSERT INTO docs_fts(docs_fts, rank) VALUES('integrity-check', 1)")
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return None


def docs(n: NodeProc) -> list[tuple[Any, ...]]:
    return n.query("SELECT id, body FROM docs ORDER BY id")


def pending(n: NodeProc) -> int:
    return int(n.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                       "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0])


def settled(nodes: list[NodeProc], rows: int) -> bool:
    first = docs(nodes[0])
    return (len(first) == rows and all(docs(n) == first for n in nodes[1:])
            and all(pending(n) == 0 for n in nodes)
            and all(sorted(n.query("SELECT id FROM audit")) ==
                    sorted(nodes[0].query("SELECT id FROM audit")) for n in nodes[1:]))


def trigger_sql(n: NodeProc, name: str) -> str:
    return str(n.query("SELECT sql FROM sqlite_master WHERE name = ?", (name,))[0][0])


def check_derived(nodes: list[NodeProc], expect: dict[str, list[int]]) -> None:
    for n in nodes:
        got = {w: match(n, w) for w in expect}
        assert got == expect, f"node {n.node_id}: MATCH gave {got}"
        assert fts_integrity(n) is None, f"node {n.node_id}: {fts_integrity(n)}"
        count = n.query("SELECT count(*) FROM docs")[0][0]
        assert n.query("SELECT n FROM doc_stats") == [(count,)], f"node {n.node_id}"
        # the audit trigger still fires once per logical write (on the writing node only)
        inserted = n.query("SELECT count(*) FROM audit")[0][0]
        assert inserted == n.query("SELECT max(id) FROM docs")[0][0], f"node {n.node_id}"
        # triggers writing only what is not replicated fire for replicated rows; the others not
        for name in ("docs_ai", "docs_ad", "docs_au", "docs_count_ai", "docs_count_ad"):
            assert GUARD not in trigger_sql(n, name), f"node {n.node_id}: {name}"
        assert GUARD in trigger_sql(n, "docs_audit"), f"node {n.node_id}"


@pytest.fixture
def pair(tmp_path: Path, nats_server: NatsServer) -> Iterator[list[NodeProc]]:
    nodes = [make_node(tmp_path, i, node_cfg(nats_server), SCHEMA).start() for i in (1, 2)]
    yield nodes
    for n in nodes:
        n.stop()


def test_fts5_external_content_index_and_counter_right_on_every_node(
        pair: list[NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO docs VALUES (1, 'the quick brown fox')")
    b.execute("INSERT INTO docs VALUES (2, 'a lazy fox sleeps')")
    b.execute("INSERT INTO docs VALUES (3, 'hello world')")
    wait_until(lambda: settled(pair, 3), 30, "three rows everywhere")
    a.execute("UPDATE docs SET body = 'the quick brown dog' WHERE id = 1")
    b.execute("DELETE FROM docs WHERE id = 3")
    a.execute("INSERT INTO docs VALUES (4, 'fox and dog')")
    wait_until(lambda: settled(pair, 3) and docs(b)[0][1].endswith("dog"), 30, "converged")
    check_derived(pair, {"fox": [2, 4], "dog": [1, 4], "hello": [], "quick": [1]})
    assert "docs_fts" in a.log_text() and "docs_ai" in a.log_text()


def test_new_node_from_a_snapshot_keeps_the_index_right(tmp_path: Path,
                                                       nats_server: NatsServer) -> None:
    store = tmp_path / "store"
    store.mkdir()
    a = make_node(tmp_path, 1, node_cfg(nats_server, store), SCHEMA).start()
    try:
        for i in range(1, 6):
            a.execute("INSERT INTO docs VALUES (?, ?)", (i, f"fox number {i}"))
        a.execute("UPDATE docs SET body = 'a dog' WHERE id = 5")
        wait_until(lambda: pending(a) == 0, 30, "a to publish")
        res = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(a.config_path),
                              "snapshot", "save"], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        c = make_node(tmp_path, 3, node_cfg(nats_server, store), None)
        assert not c.db.exists()
        c.start()
        try:
            assert "Snapshot restored" in c.log_text()
            # the restored copy's triggers were decided with this node's table filter at once
            assert "may miss rows" not in c.log_text()
            wait_until(lambda: settled([a, c], 5), 30, "c to catch up")
            check_derived([a, c], {"fox": [1, 2, 3, 4], "dog": [5]})
            # both ways after the restore
            a.execute("INSERT INTO docs VALUES (6, 'fox six')")
            c.execute("INSERT INTO docs VALUES (7, 'dog seven')")
            c.execute("DELETE FROM docs WHERE id = 1")
            a.execute("UPDATE docs SET body = 'no longer a canine' WHERE id = 5")
            wait_until(lambda: settled([a, c], 6) and docs(c)[3][1].startswith("no"), 30,
                       "converged after the restore")
            check_derived([a, c], {"fox": [2, 3, 4, 6], "dog": [7], "canine": [5]})
        finally:
            c.stop()
    finally:
        a.stop()


def test_index_kept_only_for_local_writes_before_is_rebuilt(pair: list[NodeProc]) -> None:
    """A database where the triggers were guarded (an earlier version): rows applied from other
    nodes never reached its index. The next start lets the triggers fire and rebuilds it."""
    a, b = pair
    a.execute("INSERT INTO docs VALUES (1, 'first fox')")
    wait_until(lambda: settled(pair, 1), 30, "b to have row 1")
    b.stop()
    conn = b.connect()
    for name in ("docs_ai", "docs_ad", "docs_au"):
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0]
        if GUARD in sql:
            continue
        guarded = sql.replace(" BEGIN", f" WHEN (SELECT applying FROM {GUARD} WHERE id = 1) "
                                        "IS NOT 1 BEGIN", 1)
        conn.executescript(f"DROP TRIGGER {name}; {guarded};")
    # what the replicator of that version did with a row from node 1: no index entry
    conn.executescript(f"BEGIN; UPDATE {GUARD} SET applying = 1; "
                       "INSERT INTO docs VALUES (2, 'second fox'); "
                       f"UPDATE {GUARD} SET applying = 0; COMMIT;")
    conn.close()
    assert fts_integrity(b) is not None
    a.execute("INSERT INTO docs VALUES (2, 'second fox')")
    wait_until(lambda: pending(a) == 0, 30, "a to publish row 2")
    mark = len(b.log_text())
    b.start()
    wait_until(lambda: settled(pair, 2), 30, "converged")
    assert "full-text index 'docs_fts' rebuilt" in b.log_text()[mark:]
    assert match(b, "fox") == [1, 2] and fts_integrity(b) is None


def test_index_added_by_a_migration_while_running(tmp_path: Path,
                                                  nats_server: NatsServer) -> None:
    """The application adds the index and its triggers to running nodes (each node its own
    migration, filling the index with 'rebuild'); rows written after are indexed everywhere."""
    base = "CREATE TABLE docs(id INTEGER PRIMARY KEY, body TEXT);"
    cfg = {"nats": {"urls": [nats_server.url]}, "replication_log": {"shards": 2}}
    nodes = [make_node(tmp_path, i, cfg, base).start() for i in (1, 2)]
    a, b = nodes
    try:
        a.execute("INSERT INTO docs VALUES (1, 'old fox')")
        wait_until(lambda: docs(b) == docs(a) == [(1, "old fox")], 30, "row 1 everywhere")
        index = SCHEMA[SCHEMA.index("CREATE VIRTUAL"):SCHEMA.index("CREATE TABLE audit")]
        for n in nodes:
            conn = n.connect()
            conn.executescript(index + "INSERT INTO docs_fts(docs_fts) VALUES ('rebuild');")
            conn.close()
        for n in nodes:
            # (the node logs what it decided for the new trigger)
            wait_until(lambda n=n: "trigger 'docs_ai'" in n.log_text(), 30,
                       f"node {n.node_id} to follow the migration")
        a.execute("INSERT INTO docs VALUES (2, 'new fox')")
        b.execute("INSERT INTO docs VALUES (3, 'another fox')")
        a.execute("UPDATE docs SET body = 'old dog' WHERE id = 1")
        wait_until(lambda: len(docs(a)) == 3 and docs(a) == docs(b) and docs(b)[0][1] == "old dog"
                   and pending(a) == pending(b) == 0, 30, "converged")
        for n in nodes:
            assert match(n, "fox") == [2, 3] and match(n, "dog") == [1], n.node_id
            assert fts_integrity(n) is None, n.node_id
    finally:
        for n in nodes:
            n.stop()


SHADOW_SCHEMA = """
CREATE VIRTUAL TABLE notes USING fts5(body);
CREATE TABLE notes_meta(id INTEGER PRIMARY KEY, v TEXT);
CREATE VIRTUAL TABLE boxes USING rtree(id, x0, x1);
CREATE TABLE boxes_owner(id INTEGER PRIMARY KEY, who TEXT);
"""


def test_tables_named_like_shadow_tables_are_replicated(tmp_path: Path,
                                                        nats_server: NatsServer) -> None:
    cfg = {"nats": {"urls": [nats_server.url]}}
    a = make_node(tmp_path, 1, cfg, SHADOW_SCHEMA).start()
    b = make_node(tmp_path, 2, cfg, SHADOW_SCHEMA).start()
    try:
        a.execute("INSERT INTO notes_meta VALUES (1, 'kept')")
        a.execute("INSERT INTO boxes_owner VALUES (1, 'me')")
        wait_until(lambda: b.query("SELECT * FROM notes_meta") == [(1, "kept")]
                   and b.query("SELECT * FROM boxes_owner") == [(1, "me")], 30,
                   "notes_meta and boxes_owner to replicate")
        text = a.log_text()
        # every table left out is named with the reason
        assert "virtual table 'notes'" in text and "virtual table 'boxes'" in text
        for shadow in ("notes_data", "notes_idx", "notes_content", "notes_docsize",
                       "notes_config"):
            assert f"{shadow} (shadow table of 'notes')" in text, shadow
        for shadow in ("boxes_node", "boxes_parent", "boxes_rowid"):
            assert f"{shadow} (shadow table of 'boxes')" in text, shadow
    finally:
        a.stop()
        b.stop()
