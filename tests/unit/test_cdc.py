"""Change capture on real SQLite files: triggers, guard, idempotence, cleanup."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.install import harmonylite_objects, install, remove_all
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import open_connection


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = open_connection(tmp_path / "t.db")
    c.execute('CREATE TABLE "order items"("order id" INTEGER PRIMARY KEY, "a""b" TEXT, n REAL)')
    c.execute("CREATE TABLE pairs(a TEXT, b INTEGER, v TEXT, PRIMARY KEY (b, a))")
    c.execute("CREATE TABLE nokey(x TEXT)")
    return c


def pending(conn: sqlite3.Connection) -> list[changelog.Change]:
    return read_changes(conn, changelog.watermark(conn), 1000)[0]


def entries(conn: sqlite3.Connection) -> list[tuple[int, tuple[object, ...]]]:
    found = changelog.read_entries(conn, 0, 1000, changelog.registry(conn))
    return [(e.op, e.key) for e in found]


def test_every_write_is_captured_by_key_and_published_as_the_row_is_now(
        conn: sqlite3.Connection) -> None:
    install(conn)
    conn.execute('INSERT INTO "order items" VALUES (1, \'x\', 1.5)')
    conn.execute('UPDATE "order items" SET "a""b" = \'y\' WHERE "order id" = 1')
    assert entries(conn) == [(ddl.OP_INSERT, (1,)), (ddl.OP_UPDATE, (1,))]
    # several changes to a row collapse into its current state
    assert [(c.op, c.values) for c in pending(conn)] == [(ddl.OP_UPDATE, (1, "y", 1.5))]
    conn.execute('UPDATE "order items" SET "order id" = 2 WHERE "order id" = 1')
    assert entries(conn)[2:] == [(ddl.OP_DELETE, (1,)), (ddl.OP_UPDATE, (2,))]  # key change
    assert [(c.op, c.values) for c in pending(conn)] == [
        (ddl.OP_DELETE, (1, None, None)), (ddl.OP_UPDATE, (2, "y", 1.5))]
    conn.execute('DELETE FROM "order items"')
    assert [(c.op, c.values) for c in pending(conn)] == [
        (ddl.OP_DELETE, (1, None, None)), (ddl.OP_DELETE, (2, None, None))]


def test_composite_key_order_and_rowid_tables(conn: sqlite3.Connection,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        report = install(conn)
    assert report.rowid_keyed == ["nokey"]
    assert "no primary key" in caplog.text
    shapes = changelog.shapes_by_name(conn)
    assert shapes["pairs"].pk == ("b", "a")
    assert shapes["nokey"].columns == shapes["nokey"].pk == ("x",)  # identified by content
    conn.execute("INSERT INTO nokey VALUES ('q')")
    conn.execute("INSERT INTO nokey VALUES ('q')")  # equal rows repeat: nothing collapses
    conn.execute("UPDATE nokey SET x = 'r' WHERE rowid = 1")
    assert [(c.op, c.values) for c in pending(conn)] == [
        (ddl.OP_INSERT, ("q",)), (ddl.OP_INSERT, ("q",)), (ddl.OP_DELETE, ("q",)),
        (ddl.OP_UPDATE, ("r",))]
    conn.execute("INSERT INTO pairs VALUES ('x', 5, 'v')")
    assert entries(conn)[-1] == (ddl.OP_INSERT, (5, "x"))  # key order, not column order


def test_guard_skips_the_replicators_writes(conn: sqlite3.Connection, tmp_path: Path) -> None:
    install(conn)
    conn.execute("BEGIN")
    conn.execute(f"UPDATE {ddl.GUARD} SET applying = 1")
    conn.execute("INSERT INTO pairs VALUES ('a', 1, 'v')")
    # Another connection never sees applying = 1: its writes are still captured.
    other = open_connection(tmp_path / "t.db")
    conn.execute(f"UPDATE {ddl.GUARD} SET applying = 0")
    conn.execute("COMMIT")
    other.execute("INSERT INTO pairs VALUES ('b', 2, 'w')")
    assert entries(conn) == [(ddl.OP_INSERT, (2, "b"))]


def test_missing_guard_row_means_capture(conn: sqlite3.Connection) -> None:
    install(conn)
    conn.execute(f"DELETE FROM {ddl.GUARD}")
    conn.execute("INSERT INTO pairs VALUES ('a', 1, 'v')")
    assert len(pending(conn)) == 1


def test_install_is_idempotent_and_follows_schema_changes(conn: sqlite3.Connection) -> None:
    install(conn)
    before = sorted(harmonylite_objects(conn))
    conn.execute("INSERT INTO pairs VALUES ('a', 1, 'v')")
    install(conn)
    assert sorted(harmonylite_objects(conn)) == before
    assert len(pending(conn)) == 1  # nothing pending was lost by re-installing
    # No re-install needed for a new column: the row is read as it is when published.
    conn.execute("ALTER TABLE pairs ADD COLUMN extra BLOB")
    conn.execute("INSERT INTO pairs VALUES ('b', 2, 'w', X'01')")
    assert pending(conn)[-1].values == ("b", 2, "w", b"\x01")
    # A pending change published after a column was dropped: no value changes column.
    conn.execute("ALTER TABLE pairs DROP COLUMN v")
    assert [c.values for c in pending(conn)] == [("a", 1, None), ("b", 2, b"\x01")]
    conn.execute("CREATE TABLE wide(" + ", ".join(f"c{i} INT" for i in range(12)) +
                 ", PRIMARY KEY (c0))")
    conn.execute("INSERT INTO wide VALUES (" + ", ".join(str(i) for i in range(12)) + ")")
    report = install(conn)  # a table created after capture started: its rows are captured
    assert report.backfilled == {"wide": 1}
    assert pending(conn)[-1].values == tuple(range(12))


def test_a_rebuilt_table_gets_capture_back_with_its_rows(conn: sqlite3.Connection) -> None:
    install(conn)
    conn.execute("INSERT INTO pairs VALUES ('a', 1, 'v')")
    changelog.mark_published(conn, pending(conn)[-1].id)
    # create new, copy, drop old, rename new (sqlite-utils transform, Django, Alembic batch)
    conn.executescript("""
        CREATE TABLE pairs_new(a TEXT, b INTEGER, v TEXT, w TEXT, PRIMARY KEY (b, a));
        INSERT INTO pairs_new(a, b, v) SELECT a, b, v FROM pairs;
        DROP TABLE pairs;
        ALTER TABLE pairs_new RENAME TO pairs;
        INSERT INTO pairs VALUES ('b', 2, 'x', 'written before capture came back');
    """)
    report = install(conn)
    assert report.backfilled == {"pairs": 2}
    assert sorted(c.values for c in pending(conn)) == [
        ("a", 1, "v", None), ("b", 2, "x", "written before capture came back")]
    conn.execute("UPDATE pairs SET w = 'later' WHERE b = 1")
    assert pending(conn)[-1].values == ("a", 1, "v", "later")
    # exactly one set of triggers on the table, none left for the old one
    names = [n for (n,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'pairs'")]
    assert len(names) == 3


def test_application_ddl_is_never_refused_because_of_capture(conn: sqlite3.Connection) -> None:
    install(conn)
    conn.execute("ALTER TABLE pairs DROP COLUMN v")
    conn.execute("ALTER TABLE pairs RENAME COLUMN a TO aa")  # a key column
    conn.execute("INSERT INTO pairs VALUES ('k', 3)")
    assert pending(conn)[-1].values == ("k", 3)


def test_mark_published_and_prune(conn: sqlite3.Connection) -> None:
    install(conn)
    for i in range(5):
        conn.execute("INSERT INTO pairs VALUES (?, ?, 'v')", (str(i), i))
    ids = [c.id for c in pending(conn)]
    changelog.mark_published(conn, ids[2])
    assert changelog.pending_count(conn) == 2
    assert changelog.prune(conn) == 2  # the newest published row stays
    assert [c.id for c in pending(conn)] == ids[3:]
    changelog.mark_published(conn, ids[0])  # never moves back
    assert changelog.watermark(conn) == ids[2]


def test_ids_keep_increasing_after_everything_is_pruned(conn: sqlite3.Connection) -> None:
    install(conn)
    for i in range(3):
        conn.execute("INSERT INTO pairs VALUES (?, ?, 'v')", (str(i), i))
    last = pending(conn)[-1].id
    changelog.mark_published(conn, last)
    changelog.prune(conn)
    conn.execute("INSERT INTO pairs VALUES ('new', 99, 'v')")
    # Were ids to restart at 1, this change would sit below the watermark and never be sent.
    assert [c.values for c in pending(conn)] == [("new", 99, "v")]


def test_remove_all_leaves_only_user_objects(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX pairs_v ON pairs(v)")
    conn.execute("CREATE TRIGGER user_trig AFTER INSERT ON pairs BEGIN SELECT 1; END")
    schema = sorted(conn.execute("SELECT type, name FROM sqlite_master").fetchall())
    install(conn)
    assert remove_all(conn) > 0
    assert sorted(conn.execute("SELECT type, name FROM sqlite_master").fetchall()) == schema
    conn.execute("INSERT INTO pairs VALUES ('z', 9, 'v')")  # the application still works


def test_virtual_tables_are_skipped(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE VIRTUAL TABLE docs USING fts5(body)")
    report = install(conn)
    assert report.skipped_virtual == ["docs"]
    assert "docs_data" not in {t.name for t in report.tables}
    conn.execute("INSERT INTO docs VALUES ('hello')")  # no trigger, no failure
