"""The applier's parts on their own: each is built from the parts it uses, nothing more."""

from __future__ import annotations

from pathlib import Path

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.install import install
from harmonylite.db.connection import open_connection, savepoint, write_transaction
from harmonylite.replication import parking
from harmonylite.replication.event import Batch, RowChange
from harmonylite.replication.local_tables import LocalTables
from harmonylite.replication.outcome import APPLIED, PARKED
from harmonylite.replication.own_changes import OwnOrigins
from harmonylite.replication.parking import ParkedChanges
from harmonylite.replication.row_apply import RowApplier
from harmonylite.replication.settle import Settle


def test_row_applier_writes_one_row_and_parks_what_the_parked_part_holds(tmp_path: Path) -> None:
    conn = open_connection(tmp_path / "db.db")
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, a)")
    install(conn)
    parking.ensure_origin_column(conn)  # (the applier's, when it reads the schema)
    tables = LocalTables()
    parked = ParkedChanges(Settle(0.0))
    rows = RowApplier(tables, OwnOrigins(), changelog.PendingKeys(), parked)
    cols = {"t": ("id", "a"), "gone": ("id", "a")}
    keys = {"t": ("id",), "gone": ("id",)}
    to_t = RowChange("t", ddl.OP_INSERT, (1, "x"))
    to_gone = RowChange("gone", ddl.OP_INSERT, (1, "y"))
    batch = Batch(2, cols, keys, [to_t, to_gone])
    with write_transaction(conn):
        tables.reload(conn)
        parked.reload(conn)
        with savepoint(conn, "test"):
            assert rows.apply(conn, "s-1", 1, batch, to_t) == APPLIED
            assert rows.apply(conn, "s-1", 1, batch, to_gone) == PARKED
    assert conn.execute("SELECT id, a FROM t").fetchall() == [(1, "x")]
    assert parked.tables == {"gone"} and parking.counts(conn) == {"gone": 1}
    # A later change to the table waits behind it, even once the table exists.
    conn.execute("CREATE TABLE gone(id INTEGER PRIMARY KEY, a)")
    with write_transaction(conn):
        tables.reload(conn)
        assert rows.apply(conn, "s-1", 2, batch, to_gone) == PARKED
        assert parked.unpark(conn, lambda t: tables.columns(conn, t),
                             lambda item: rows.apply(conn, item.stream, item.seq, item.batch(),
                                                     item.change(), parked=True)) == 2
    assert conn.execute("SELECT id, a FROM gone").fetchall() == [(1, "y")]
    assert parked.tables == set()
