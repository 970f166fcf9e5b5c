"""Change capture on real SQLite files: triggers, guard, idempotence, cleanup."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.install import harmonylite_objects, install, remove_all
from harmonylite.db.connection import open_connection


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = open_connection(tmp_path / "t.db")
    c.execute('CREATE TABLE "order items"("order id" INTEGER PRIMARY KEY, "a""b" TEXT, n REAL)')
    c.execute("CREATE TABLE pairs(a TEXT, b INTEGER, v TEXT, PRIMARY KEY (b, a))")
    c.execute("CREATE TABLE nokey(x TEXT)")
    return c


def pending(conn: sqlite3.Connection) -> list[changelog.Change]:
    return changelog.read_pending(conn, changelog.watermark(conn), 1000, changelog.registry(conn))


def test_every_write_is_captured_with_whole_rows(conn: sqlite3.Connection) -> None:
    install(conn)
    conn.execute('INSERT INTO "order items" VALUES (1, \'x\', 1.5)')
    conn.execute('UPDATE "order items" SET "a""b" = \'y\' WHERE "order id" = 1')
    conn.execute('UPDATE "order items" SET "order id" = 2 WHERE "order id" = 1')
    conn.execute('DELETE FROM "order items"')
    got = [(c.table, c.op, c.values) for c in pending(conn)]
    assert got == [
        ("order items", ddl.OP_INSERT, (1, "x", 1.5)),
        ("order items", ddl.OP_UPDATE, (1, "y", 1.5)),
        ("order items", ddl.OP_DELETE, (1, None, None)),  # key change: old key deleted
        ("order items", ddl.OP_UPDATE, (2, "y", 1.5)),
        ("order items", ddl.OP_DELETE, (2, None, None)),
    ]


def test_composite_key_order_and_rowid_tables(conn: sqlite3.Connection,
                                              caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        report = install(conn)
    assert report.rowid_keyed == ["nokey"]
    assert "no primary key" in caplog.text
    shapes = changelog.shapes_by_name(conn)
    assert shapes["pairs"].pk == ("b", "a")
    assert shapes["nokey"].columns == ("rowid", "x")
    conn.execute("INSERT INTO nokey VALUES ('q')")
    assert pending(conn)[-1].values == (1, "q")


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
    assert [c.values for c in pending(conn)] == [("b", 2, "w")]


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
    conn.execute("ALTER TABLE pairs ADD COLUMN extra BLOB")
    conn.execute("CREATE TABLE wide(" + ", ".join(f"c{i} INT" for i in range(12)) +
                 ", PRIMARY KEY (c0))")
    install(conn)
    conn.execute("INSERT INTO pairs VALUES ('b', 2, 'w', X'01')")
    conn.execute("INSERT INTO wide VALUES (" + ", ".join(str(i) for i in range(12)) + ")")
    changes = pending(conn)
    assert changes[-2].values == ("b", 2, "w", b"\x01")
    assert changes[-1].values == tuple(range(12))


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
