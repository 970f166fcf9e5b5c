"""Replicated schema changes without NATS: plans checked against SQLite, capture on one database,
the message, apply on another (real SQLite files)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc import changelog, schema_changes, schema_plan
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.cdc.schema_plan import PlanError
from harmonylite.config import parse_config
from harmonylite.db.connection import open_connection, write_transaction
from harmonylite.node.shared_settings import Record, own_settings
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import decode, encode, encode_schema_change


def objs(*stmts: str) -> schema_plan.Objects:
    conn = sqlite3.connect(":memory:")
    for s in stmts:
        conn.execute(s)
    out = schema_plan.objects(conn)
    conn.close()
    return out


def after(before: list[str], *change: str) -> schema_plan.Objects:
    return objs(*before, *change)


BASE = ["CREATE TABLE book(id INTEGER PRIMARY KEY, title TEXT NOT NULL, year INT)",
        "CREATE INDEX book_year ON book(year)",
        "CREATE TABLE author(id INTEGER PRIMARY KEY, name TEXT)",
        "CREATE VIEW recent AS SELECT * FROM book WHERE year > 2000",
        "CREATE TRIGGER stamp AFTER INSERT ON book BEGIN UPDATE author SET id = id; END"]

CHANGES = {
    "add column": ["ALTER TABLE book ADD COLUMN isbn TEXT DEFAULT 'x'"],
    "drop column": ["ALTER TABLE author DROP COLUMN name"],
    "rename column": ["ALTER TABLE book RENAME COLUMN title TO name"],
    "rename table": ["ALTER TABLE author RENAME TO writer"],
    "create": ["CREATE TABLE shelf(id INTEGER PRIMARY KEY, book_id REFERENCES book(id))",
               "CREATE UNIQUE INDEX shelf_book ON shelf(book_id)"],
    "drop": ["DROP VIEW recent", "DROP TRIGGER stamp", "DROP TABLE book"],
    "rebuild": ["PRAGMA legacy_alter_table = ON",
                'CREATE TABLE "new__book" (id INTEGER PRIMARY KEY, title TEXT NOT NULL, '
                "year INT NOT NULL, pages INT NOT NULL)",
                'INSERT INTO "new__book" (id, title, year, pages) SELECT id, title, '
                "coalesce(year, 0), 1 FROM book",
                "DROP TABLE book", 'ALTER TABLE "new__book" RENAME TO "book"',
                "CREATE INDEX book_year ON book(year)", "PRAGMA legacy_alter_table = OFF"],
    "fts": ["CREATE VIRTUAL TABLE find USING fts5(title)"],
}


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_plan_reproduces_the_schema_exactly(name: str) -> None:
    before, target = objs(*BASE), after(BASE, *CHANGES[name])
    stmts = schema_plan.plan(before, target)
    assert stmts
    conn = sqlite3.connect(":memory:")
    for s in BASE:
        conn.execute(s)
    conn.execute("INSERT INTO book(id, title, year) VALUES (1, 't', 2001)")
    for s in stmts:
        conn.execute(s)
    assert schema_plan.objects(conn) == target
    if name in ("add column", "rename column"):
        assert stmts[0].startswith("ALTER TABLE") and len(stmts) == 1


def test_rebuild_keeps_rows_and_fills_new_not_null_columns() -> None:
    before, target = objs(*BASE), after(BASE, *CHANGES["rebuild"])
    conn = sqlite3.connect(":memory:")
    for s in BASE:
        conn.execute(s)
    conn.execute("INSERT INTO book(id, title, year) VALUES (1, 't', 2001)")
    for s in schema_plan.plan(before, target):
        conn.execute(s)
    assert conn.execute("SELECT id, title, year, pages FROM book").fetchall() == [
        (1, "t", 2001, 0)]


def test_a_module_this_sqlite_lacks_is_refused() -> None:
    before = objs(*BASE)
    target = dict(before)
    target["vec"] = schema_plan.Obj("table", "vec", "vec",
                                    "CREATE VIRTUAL TABLE vec USING vec0(embedding float[4])")
    with pytest.raises(PlanError, match="no such module: vec0"):
        schema_plan.plan(before, target)


def node(tmp_path: Path, name: str) -> sqlite3.Connection:
    conn = open_connection(tmp_path / f"{name}.db")
    for s in BASE:
        conn.execute(s)
    install(conn)
    schema_changes.capture_now(conn, 0, None)  # the first look remembers the schema
    return conn


def message(change: schema_changes.SchemaChange, node_id: int) -> bytes:
    doc = json.loads(schema_changes.encode_touched(change.objects))
    return encode_schema_change(node_id, "e1", change.uid, doc, change.stmts, True)


def migrate(conn: sqlite3.Connection, *stmts: str, node_id: int) -> schema_changes.SchemaChange:
    with write_transaction(conn):
        for s in stmts:
            conn.execute(s)
    install(conn)
    change = schema_changes.capture_now(conn, node_id, None)
    assert change is not None and change.state == "pending"
    return change


def test_captured_change_applies_on_another_node(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    change = migrate(a, *CHANGES["rebuild"], node_id=1)
    assert schema_changes.capture_now(a, 1, None) is None  # captured once
    applier = Applier(replicate_ddl=True, origin="2:e2")
    result = applier.apply(b, "s-1", [(1, message(change, 1))])
    assert result.failed == []
    assert schema_plan.objects(b) == schema_plan.objects(a)
    assert [c.state for c in schema_changes.rows(b)] == ["applied"]
    # Capture is back on the rebuilt table, and the change is not sent again from here.
    b.execute("INSERT INTO book(id, title, year, pages) VALUES (5, 'x', 1, 1)")
    assert b.execute("SELECT count(*) FROM __harmonylite__log").fetchone()[0] == 1
    assert schema_changes.capture_now(b, 2, None) is None
    # The same message again changes nothing.
    applier.apply(b, "s-1", [(2, message(change, 1))])
    assert [c.state for c in schema_changes.rows(b)] == ["applied"]


def test_concurrent_changes_end_with_the_first_in_the_stream(tmp_path: Path) -> None:
    a, b, c = node(tmp_path, "a"), node(tmp_path, "b"), node(tmp_path, "c")
    first = migrate(a, "ALTER TABLE book ADD COLUMN isbn TEXT", node_id=1)
    second = migrate(b, "ALTER TABLE book ADD COLUMN pages TEXT", node_id=2)
    b.execute("INSERT INTO book(id, title, pages) VALUES (7, 'b', 'written under b')")
    stream = [(1, message(first, 1)), (2, message(second, 2))]
    for conn, origin in ((a, "1:e1"), (b, "2:e1"), (c, "3:e1")):
        Applier(replicate_ddl=True, origin=origin).apply(conn, "s-1", stream)
    schemas = [schema_plan.objects(x) for x in (a, b, c)]
    assert schemas[0] == schemas[1] == schemas[2]
    assert "isbn" in schemas[0]["book"].sql and "pages" not in schemas[0]["book"].sql
    for conn in (a, b, c):
        states = {ch.uid: ch.state for ch in schema_changes.rows(conn)}
        assert states == {first.uid: "applied", second.uid: "lost"}
    # The loser's column is undone, not taken for the winner's; its rows are published again
    # under the winning schema.
    assert b.execute("SELECT id, title, isbn FROM book").fetchall() == [(7, "b", None)]
    assert b.execute("SELECT k0 FROM __harmonylite__log WHERE op = 4").fetchall() == [(7,)]


def test_own_changes_sent_under_the_old_schema_go_out_again(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    b.execute("INSERT INTO book(id, title, year) VALUES (3, 't', 1999)")
    top = b.execute("SELECT max(id) FROM __harmonylite__log").fetchone()[0]
    b.execute("UPDATE __harmonylite__state SET v = ? WHERE k = 'published'", (top,))
    change = migrate(a, "DROP VIEW recent", "DROP INDEX book_year",
                     "ALTER TABLE book DROP COLUMN year", node_id=1)
    Applier(replicate_ddl=True, origin="2:e2").apply(b, "s-1", [(1, message(change, 1))])
    assert schema_plan.objects(b) == schema_plan.objects(a)
    assert b.execute("SELECT op, k0 FROM __harmonylite__log WHERE id > ?",
                     (top,)).fetchall() == [(4, 3)]


def test_schema_message_round_trip() -> None:
    batch = decode(encode_schema_change(3, "e", "u1", {"t": [None, ["table", "t", "t", "x"]]},
                                        ["CREATE TABLE t(x)"], False))
    assert batch.schema == {"u": "u1", "o": {"t": [None, ["table", "t", "t", "x"]]},
                            "s": ["CREATE TABLE t(x)"]}
    assert batch.changes == []


def test_a_change_written_before_a_dropped_column_reached_its_sender_applies(
        tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    change = migrate(a, "DROP VIEW recent", "DROP INDEX book_year",
                     "ALTER TABLE book DROP COLUMN year", node_id=1)
    applier = Applier(replicate_ddl=True, origin="2:e2")
    applier.apply(b, "s-1", [(1, message(change, 1))])
    # Node 3 wrote the row before the change reached it: the row still has the column.
    c = node(tmp_path, "c")
    c.execute("INSERT INTO book(id, title, year) VALUES (9, 'old', 1990)")
    changes, shapes = read_changes(c, changelog.watermark(c), 100)
    applier.apply(b, "s-1", [(2, encode(3, changes, shapes, True))])
    applier.settle.changed_at = float("-inf")  # (the schema has settled)
    applier.retry_parked(b)
    assert b.execute("SELECT id, title FROM book").fetchall() == [(9, "old")]
    assert b.execute("SELECT count(*) FROM __harmonylite__parked").fetchone()[0] == 0


def test_replicate_ddl_must_be_shared_and_switches_the_default_exclusions() -> None:
    off, _ = parse_config({"db_path": "x.db"})
    on, _ = parse_config({"db_path": "x.db", "replicate_ddl": True})
    assert not off.replicates_table("django_migrations")
    assert on.replicates_table("django_migrations") and on.replicates_table("alembic_version")
    mine, _ = parse_config({"db_path": "x.db", "replicate_ddl": True,
                            "exclude_tables": ["audit_*"]})
    assert not mine.replicates_table("audit_1") and mine.replicates_table("django_migrations")
    recorded = Record(own_settings(on))
    assert [(d.key, d.ours, d.cluster) for d in recorded.differences(off)] == [
        ("replicate_ddl", False, True)]
    # A record written before the setting existed: its cluster ran without it.
    older = Record({k: v for k, v in own_settings(off).items() if k != "replicate_ddl"})
    assert older.differences(off) == []
    assert "replicate_ddl = true on this node, the cluster's is false" in str(
        older.differences(on)[0])


def test_a_message_carrying_other_statements_is_refused(tmp_path: Path) -> None:
    b = node(tmp_path, "b")
    evil = tmp_path / "evil.db"
    payload = encode_schema_change(1, "e", "u9", {"x": [None, ["table", "x", "x",
                                                              "CREATE TABLE x(a)"]]},
                                   [f"ATTACH DATABASE '{evil}' AS e", "CREATE TABLE x(a)"], False)
    Applier(replicate_ddl=True, origin="2:e2").apply(b, "s-1", [(1, payload)])
    assert not evil.exists()
    assert [(c.state, "ATTACH" in c.reason) for c in schema_changes.rows(b)] == [("failed", True)]
    assert "x" not in schema_plan.objects(b)


def test_the_same_migration_run_on_two_nodes_is_applied_once(tmp_path: Path) -> None:
    a, b = node(tmp_path, "a"), node(tmp_path, "b")
    first = migrate(a, "CREATE TABLE shelf(id INTEGER PRIMARY KEY)", node_id=1)
    second = migrate(b, "CREATE TABLE shelf(id INTEGER PRIMARY KEY)", node_id=2)
    stream = [(1, message(first, 1)), (2, message(second, 2))]
    for conn, origin in ((a, "1:e1"), (b, "2:e1")):
        Applier(replicate_ddl=True, origin=origin).apply(conn, "s-1", stream)
        assert {c.uid: c.state for c in schema_changes.rows(conn)} == {
            first.uid: "applied", second.uid: "applied"}
    assert schema_plan.objects(a) == schema_plan.objects(b)


def test_a_malformed_schema_change_is_recorded_and_the_stream_goes_on(tmp_path: Path) -> None:
    b = node(tmp_path, "b")
    payload = encode_schema_change(1, "e", "u7", {"x": ["not", "an object"]}, [], False)
    result = Applier(replicate_ddl=True, origin="2:e2").apply(b, "s-1", [(1, payload)])
    assert result.last_seq == 1
    assert [(c.uid, c.state) for c in schema_changes.rows(b)] == [("u7", "failed")]


def test_a_change_that_fails_here_leaves_capture_in_place(tmp_path: Path) -> None:
    b = node(tmp_path, "b")
    before = schema_plan.objects(b)["book"]
    after = schema_plan.Obj("table", "book", "book", before.sql[:-1] + ", m TEXT COLLATE mine)")
    stmt = "ALTER TABLE book ADD COLUMN m TEXT COLLATE mine"  # a collation only the origin has
    payload = encode_schema_change(1, "e", "u5", {"book": [before.as_list(), after.as_list()]},
                                   [stmt], False)
    Applier(replicate_ddl=True, origin="2:e2").apply(b, "s-1", [(1, payload)])
    change = schema_changes.get(b, "u5")
    assert change is not None and change.state == "failed" and "mine" in change.reason
    assert schema_plan.objects(b)["book"] == before
    triggers = b.execute("SELECT count(*) FROM sqlite_schema WHERE type = 'trigger' AND "
                         "tbl_name = 'book' AND name LIKE '\\_\\_harmonylite%' ESCAPE '\\'"
                         ).fetchone()[0]
    assert triggers == 3
