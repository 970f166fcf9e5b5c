"""Which application triggers fire for replicated rows, and which tables capture leaves out."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc import catalogue as cat
from harmonylite.cdc.app_triggers import GUARD_EXPR
from harmonylite.cdc.install import install, remove_all
from harmonylite.db.connection import open_connection

SCHEMA = """
CREATE TABLE docs(id INTEGER PRIMARY KEY, body TEXT);
CREATE VIRTUAL TABLE docs_fts USING fts5(body, content='docs', content_rowid='id');
CREATE TABLE audit(id INTEGER PRIMARY KEY, doc_id INTEGER);
CREATE TABLE counts(id INTEGER PRIMARY KEY, n INTEGER);
CREATE TABLE summary(id INTEGER PRIMARY KEY, body TEXT);
CREATE TRIGGER fts_ai AFTER INSERT ON docs BEGIN
  INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body); END;
CREATE TRIGGER audit_ai AFTER INSERT ON docs BEGIN
  INSERT INTO audit(doc_id) VALUES (new.id); END;
CREATE TRIGGER both_au AFTER UPDATE OF body ON docs BEGIN
  INSERT INTO audit(doc_id) VALUES (new.id);
  INSERT INTO docs_fts(docs_fts, rowid, body) VALUES ('delete', old.id, old.body);
  INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body); END;
CREATE TRIGGER check_bi BEFORE INSERT ON docs WHEN new.body IS NULL BEGIN
  SELECT RAISE(ABORT, 'body required'); END;
CREATE TRIGGER count_ad AFTER DELETE ON docs BEGIN
  UPDATE counts SET n = n - 1 WHERE id = 1; END;
CREATE TRIGGER summary_ai AFTER INSERT ON summary BEGIN
  INSERT INTO docs_fts(rowid, body) VALUES (new.id + 1000000, new.body); END;
CREATE VIEW docs_v AS SELECT id, body FROM docs;
CREATE TRIGGER docs_v_ii INSTEAD OF INSERT ON docs_v BEGIN
  INSERT INTO docs(id, body) VALUES (new.id, new.body); END;
"""


@pytest.fixture
def conn(tmp_path: Path) -> sqlite3.Connection:
    c = open_connection(tmp_path / "t.db")
    c.executescript(SCHEMA)
    return c


def sql_of(conn: sqlite3.Connection, name: str) -> str:
    return str(conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (name,)).fetchone()[0])


def guarded(conn: sqlite3.Connection) -> dict[str, bool]:
    return {str(n): GUARD_EXPR in str(s) for n, s in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' "
        "AND name NOT LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\'")}


def test_triggers_are_decided_by_the_tables_they_write(conn: sqlite3.Connection) -> None:
    report = install(conn, lambda name: name != "counts")
    assert guarded(conn) == {
        "fts_ai": False,  # an index every node keeps: fires for replicated rows
        "count_ad": False,  # a table excluded from replication: each node counts for itself
        "summary_ai": False,
        "audit_ai": True,  # writes a replicated table: once per logical write
        "both_au": True,  # both: guarded, and reported
        "check_bi": True,  # writes nothing: a row its origin accepted is not refused here
        "docs_v_ii": True,  # on a view: the replicator never writes views
    }
    t = report.triggers
    assert t.firing == {"fts_ai": ["docs_fts"], "count_ad": ["counts"],
                        "summary_ai": ["docs_fts"]}
    assert t.mixed == {"both_au": (["audit"], ["docs_fts"])}
    assert sorted(t.wrapped) == ["audit_ai", "both_au", "check_bi", "docs_v_ii"]
    assert t.released == [] and t.unknown == {}
    # the application still works, and its index is right
    conn.execute("INSERT INTO docs VALUES (1, 'a fox')")
    assert conn.execute("SELECT rowid FROM docs_fts WHERE docs_fts MATCH 'fox'").fetchall() \
        == [(1,)]
    # nothing changes on a second install (no schema change for the watchers to chase)
    version = conn.execute("PRAGMA schema_version").fetchone()
    assert install(conn, lambda name: name != "counts").triggers.wrapped == []
    assert conn.execute("PRAGMA schema_version").fetchone() == version


def test_a_table_replicated_again_guards_its_triggers(conn: sqlite3.Connection) -> None:
    install(conn, lambda name: name != "counts")
    assert not guarded(conn)["count_ad"]
    report = install(conn)
    assert guarded(conn)["count_ad"] and "count_ad" in report.triggers.wrapped


def test_guard_released_rebuilds_the_full_text_index(conn: sqlite3.Connection) -> None:
    install(conn)
    # as an earlier version left it: guarded, and a row applied from another node unindexed
    conn.execute("DROP TRIGGER fts_ai")
    conn.execute(f"CREATE TRIGGER fts_ai AFTER INSERT ON docs WHEN {GUARD_EXPR} BEGIN "
                 "INSERT INTO docs_fts(rowid, body) VALUES (new.id, new.body); END")
    conn.executescript("BEGIN; UPDATE __harmonylite__guard SET applying = 1; "
                       "INSERT INTO docs VALUES (7, 'remote fox'); "
                       "UPDATE __harmonylite__guard SET applying = 0; COMMIT;")
    assert conn.execute("SELECT count(*) FROM docs_fts WHERE docs_fts MATCH 'fox'").fetchone() \
        == (0,)
    report = install(conn)
    assert report.triggers.released == ["fts_ai"] and report.triggers.rebuilt == ["docs_fts"]
    assert conn.execute("SELECT rowid FROM docs_fts WHERE docs_fts MATCH 'fox'").fetchall() \
        == [(7,)]
    conn.execute("INSERT INTO docs_fts(docs_fts, rank) VALUES ('integrity-check', 1)")


def test_contentless_index_cannot_be_rebuilt_and_says_so(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "c.db")
    conn.executescript(
        "CREATE TABLE t(id INTEGER PRIMARY KEY, b TEXT);"
        "CREATE VIRTUAL TABLE ix USING fts5(b, content='');"
        f"CREATE TRIGGER t_ai AFTER INSERT ON t WHEN {GUARD_EXPR} BEGIN "
        "INSERT INTO ix(rowid, b) VALUES (new.id, new.b); END;")
    conn.executescript("CREATE TABLE __harmonylite__guard(id INTEGER PRIMARY KEY, "
                       "applying INTEGER NOT NULL); INSERT INTO __harmonylite__guard VALUES (1, 0)")
    report = install(conn)
    assert report.triggers.released == ["t_ai"]
    assert list(report.triggers.rebuild_failed) == ["ix"]


def test_trigger_sqlite_cannot_compile_is_left_as_it_is(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "u.db")
    conn.executescript("CREATE TABLE t(id INTEGER PRIMARY KEY); CREATE TABLE gone(x);"
                       "CREATE TRIGGER t_ai AFTER INSERT ON t BEGIN INSERT INTO gone VALUES (1); "
                       "END; DROP TABLE gone;")
    report = install(conn)
    assert "no such table" in report.triggers.unknown["t_ai"]
    assert GUARD_EXPR not in sql_of(conn, "t_ai")


def test_cleanup_gives_back_every_trigger_as_written(conn: sqlite3.Connection) -> None:
    before = {str(n): str(s) for n, s in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")}
    install(conn, lambda name: name != "counts")
    remove_all(conn)
    assert {str(n): str(s) for n, s in conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'trigger'")} == before


SHADOWED = """
CREATE VIRTUAL TABLE notes USING fts5(body);
CREATE VIRTUAL TABLE ext USING fts5(body, content='notes_meta', content_rowid='id');
CREATE VIRTUAL TABLE old3 USING fts3(body);
CREATE VIRTUAL TABLE old4 USING fts4(body, content='');
CREATE VIRTUAL TABLE boxes USING rtree(id, x0, x1);
CREATE TABLE notes_meta(id INTEGER PRIMARY KEY, v TEXT);
CREATE TABLE ext_content(id INTEGER PRIMARY KEY);
CREATE TABLE boxes_owner(id INTEGER PRIMARY KEY);
CREATE TABLE notesx_data(id INTEGER PRIMARY KEY);
CREATE TABLE seqd(id INTEGER PRIMARY KEY AUTOINCREMENT);
"""


def test_shadow_tables_are_what_sqlite_says(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "s.db")
    conn.executescript(SHADOWED)
    install(conn)
    got = cat.catalogue(conn, table_list=True)
    assert got.ordinary == ["boxes_owner", "notes_meta", "notesx_data", "seqd"]
    assert got.virtual == {"boxes": "rtree", "ext": "fts5", "notes": "fts5", "old3": "fts3",
                           "old4": "fts4"}
    assert set(got.shadow) == {
        "notes_data", "notes_idx", "notes_content", "notes_docsize", "notes_config",
        "ext_data", "ext_idx", "ext_docsize", "ext_config",
        # SQLite calls a table named like one of the module's shadow tables a shadow table,
        # whether the module made it or not (an external-content index makes no _content)
        "ext_content",
        "old3_content", "old3_segments", "old3_segdir",
        "old4_segments", "old4_segdir", "old4_docsize", "old4_stat",
        "boxes_node", "boxes_parent", "boxes_rowid"}
    assert all(got.shadow[s] == s.rsplit("_", 1)[0] for s in got.shadow)
    assert got.internal == ["sqlite_sequence"]
    # without table_list (SQLite before 3.37): the same answer from the modules' shadow names
    assert cat.catalogue(conn, table_list=False) == got
