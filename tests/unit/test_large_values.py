"""Large blobs: encoded in pieces, spooled to files, applied through blob I/O. Real SQLite files,
no NATS."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from harmonylite.cdc import changelog
from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.install import install
from harmonylite.cdc.rows import read_changes
from harmonylite.db.connection import RawText, open_connection
from harmonylite.replication import large_values
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import LARGE_VALUE, decode, encode, encode_into
from harmonylite.replication.spool import PREFIX, Spooled

BIG = LARGE_VALUE + 12345


def test_encoding_in_pieces_decodes_to_the_same_batch(tmp_path: Path) -> None:
    shapes = {"t": TableShape("t", ("id", "b", "s"), ("id",))}
    changes = [Change(1, "t", 1, (1, os.urandom(BIG), "x")),
               Change(2, "t", 1, (2, b"small", RawText(b"\xff"))),
               Change(3, "t", 3, (3, None, None))]
    for compress in (False, True):
        whole = encode(7, changes, shapes, compress, "ep")
        spooled = Spooled(tmp_path)
        encode_into(spooled, 7, changes, shapes, compress, "ep")
        assert decode(spooled) == decode(whole) == decode(spooled.read())
        if not compress:
            assert spooled.read() == whole  # byte for byte what cbor2 writes
        spooled.close()
    assert not list(tmp_path.glob(PREFIX + "*"))  # closed spools leave no file


def test_a_spool_left_by_a_dead_process_is_removed(tmp_path: Path) -> None:
    stale = tmp_path / (PREFIX + "left")
    stale.write_bytes(b"x")
    Spooled(tmp_path).close()
    assert not stale.exists()


def pair(tmp_path: Path, schema: str) -> tuple[sqlite3.Connection, sqlite3.Connection]:
    src = open_connection(tmp_path / "src.db")
    dst = open_connection(tmp_path / "dst.db")
    for c in (src, dst):
        c.execute(schema)
        install(c)
    return src, dst


def ship(src: sqlite3.Connection, dst: sqlite3.Connection, applier: Applier, seq: int) -> None:
    changes, shapes = read_changes(src, changelog.watermark(src), 10_000)
    changelog.mark_published(src, changes[-1].id)
    result = applier.apply(dst, "s-1", [(seq, encode(1, changes, shapes, True, "e1"))])
    assert result.failed == []


def test_large_blobs_are_inserted_updated_and_left_alone_when_equal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    filled: list[int] = []
    write = large_values.write

    def counted(conn: sqlite3.Connection, table: str, column: str, rowid: int,
                value: bytes) -> None:
        filled.append(rowid)
        write(conn, table, column, rowid, value)

    monkeypatch.setattr(large_values, "write", counted)
    # In pieces in a rowid table (two inserts, one update; the unchanged blob is not written);
    # a WITHOUT ROWID table takes the ordinary path.
    for schema, pieces in (
            ("CREATE TABLE f(id INTEGER PRIMARY KEY, body BLOB, name TEXT)", 3),
            ("CREATE TABLE f(id TEXT PRIMARY KEY, body BLOB, name TEXT) WITHOUT ROWID", 0)):
        filled.clear()
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        src, dst = pair(d, schema)
        applier = Applier()
        one, two = os.urandom(BIG), os.urandom(BIG)
        src.execute("INSERT INTO f VALUES ('1', ?, 'a')", (one,))
        src.execute("INSERT INTO f VALUES ('2', ?, 'b')", (one,))
        ship(src, dst, applier, 1)
        src.execute("UPDATE f SET body = ?, name = 'c' WHERE id = '1'", (two,))
        src.execute("UPDATE f SET name = 'd' WHERE id = '2'")  # the blob is the same
        ship(src, dst, applier, 2)
        rows = "SELECT id, body, name, typeof(body) FROM f ORDER BY id"
        assert dst.execute(rows).fetchall() == src.execute(rows).fetchall()
        assert [r[3] for r in dst.execute(rows)] == ["blob", "blob"]
        assert len(filled) == pieces
        # The same changes again (another stream): the stored bytes compare equal, nothing is
        # written again.
        changes, shapes = read_changes(src, 0, 10_000)
        Applier().apply(dst, "s-2", [(1, encode(1, changes, shapes, True))])
        assert dst.execute(rows).fetchall() == src.execute(rows).fetchall()
        assert len(filled) == pieces
        src.close()
        dst.close()
