"""The dead-letter table: incoming changes that cannot be applied here, kept where an operator
finds them (``harmonylite dead-letters``) instead of being skipped.

A row holds the stream and sequence the change came in, its origin node, table and key, the
error, and the change itself as a one-change batch in the wire format, so ``retry`` applies it
with the ordinary applier once the cause is fixed. A message that is not a well-formed batch is
kept whole, naming the origin node, table(s) and key as far as it carries them (NULL where it
does not: bytes that are not CBOR say nothing).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cbor2

from harmonylite.cdc import ddl
from harmonylite.db.connection import RawText, fetch_all
from harmonylite.node_ids import from_sqlite, to_sqlite
from harmonylite.replication.event import Batch, RowChange, dump_values, loads_raw

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeadLetter:
    id: int
    stream: str
    seq: int
    origin: int | None
    table: str | None
    key: str | None
    error: str
    payload: bytes
    created_at: float

    def as_json(self, *, payload: bool = False) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": self.id, "stream": self.stream, "sequence": self.seq, "origin": self.origin,
            "table": self.table, "key": self.key, "error": self.error,
            "created_at": self.created_at,
        }
        if payload:
            doc["payload_hex"] = self.payload.hex()
        return doc


def key_text(values: tuple[object, ...]) -> str:
    def plain(v: object) -> object:
        if isinstance(v, RawText):
            return {"raw_text_hex": bytes(v).hex()}
        if isinstance(v, bytes):
            return {"blob_hex": v.hex()}
        if isinstance(v, float) and v != v:
            return None
        if isinstance(v, float) and v in (float("inf"), float("-inf")):
            return repr(v)
        return v

    return json.dumps([plain(v) for v in values])


def one_change_batch(batch: Batch, index: int) -> bytes:
    """The change ``index`` of ``batch`` alone, in the wire format (uncompressed)."""
    ch = batch.changes[index]
    doc: dict[str, object] = {
        "v": 1, "n": batch.node_id, "t": {ch.table: list(batch.columns[ch.table])},
        "k": {ch.table: list(batch.keys.get(ch.table, ()))},
        "c": [[ch.table, ch.op, dump_values(ch.values)]],
    }
    if batch.epoch and batch.ids:
        doc["e"], doc["i"] = batch.epoch, [batch.ids[index]]
    return bytes(cbor2.dumps(doc))


def record_change(conn: sqlite3.Connection, stream: str, seq: int, batch: Batch, index: int,
                  error: str) -> None:
    ch: RowChange = batch.changes[index]
    cols = batch.columns.get(ch.table, ())
    keys = batch.keys.get(ch.table, ())
    key = tuple(ch.values[cols.index(k)] for k in keys if k in cols)
    conn.execute(
        f"INSERT INTO {ddl.DEAD_LETTER}(stream, seq, origin, tbl, key, error, payload, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (stream, seq, to_sqlite(batch.node_id), ch.table, key_text(key), error,
         one_change_batch(batch, index), time.time()),
    )


@dataclass(frozen=True)
class About:
    """What a refused message still tells: its origin node, table and key (None: not said)."""

    origin: int | None = None
    table: str | None = None
    key: str | None = None


def about_message(data: bytes,
                  local_pk: Callable[[str], tuple[str, ...] | None] | None = None) -> About:
    """Origin, table(s) and key of a message that is not a well-formed batch, as far as it
    carries them. The key is its first change's, by the key columns the message names or, when
    it names none, by the local table's primary key (``local_pk``)."""
    doc = loads_raw(data)
    if not isinstance(doc, dict):
        return About()
    node = doc.get("n")
    origin = node if type(node) is int and 0 <= node < 2**64 else None
    raw_changes = doc.get("c")
    changes: list[Any] = raw_changes if isinstance(raw_changes, list) else []
    tables = list(dict.fromkeys(c[0] for c in changes
                                if isinstance(c, list) and c and isinstance(c[0], str)))
    if not tables and isinstance(doc.get("t"), dict):
        tables = [t for t in doc["t"] if isinstance(t, str)]
    key: str | None = None
    first = changes[0] if changes else None
    if isinstance(first, list) and len(first) == 3 and isinstance(first[0], str) \
            and isinstance(first[2], list):
        table, values = first[0], first[2]
        cols = (doc.get("t") or {}).get(table) if isinstance(doc.get("t"), dict) else None
        named = (doc.get("k") or {}).get(table) if isinstance(doc.get("k"), dict) else None
        pk = tuple(named) if isinstance(named, list) and named else (
            local_pk(table) if local_pk is not None else None)
        if isinstance(cols, list) and len(cols) == len(values) and pk \
                and all(c in cols for c in pk):
            key = key_text(tuple(values[cols.index(c)] for c in pk))
    return About(origin, ", ".join(tables) or None, key)


def record_message(conn: sqlite3.Connection, stream: str, seq: int, data: bytes,
                   error: str, about: About | None = None) -> None:
    """A whole message that is not a change batch, with what it tells (``about_message``)."""
    about = about or About()
    conn.execute(
        f"INSERT INTO {ddl.DEAD_LETTER}(stream, seq, origin, tbl, key, error, payload, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (stream, seq, to_sqlite(about.origin), about.table, about.key, error, data,
         time.time()),
    )


def count(conn: sqlite3.Connection) -> int:
    try:
        return int(conn.execute(f"SELECT count(*) FROM {ddl.DEAD_LETTER}").fetchone()[0])
    except sqlite3.OperationalError:  # not installed yet
        return 0


def rows(conn: sqlite3.Connection, ident: int | None = None) -> list[DeadLetter]:
    sql = (f"SELECT id, stream, seq, origin, tbl, key, error, payload, created_at "
           f"FROM {ddl.DEAD_LETTER}")
    params: tuple[object, ...] = ()
    if ident is not None:
        sql += " WHERE id = ?"
        params = (ident,)
    return [DeadLetter(int(r[0]), str(r[1]), int(r[2]), from_sqlite(r[3]), r[4], r[5],
                       str(r[6]),
                       bytes(r[7]), float(r[8]))
            for r in fetch_all(conn, sql + " ORDER BY id", params)]


def delete(conn: sqlite3.Connection, ident: int) -> None:
    conn.execute(f"DELETE FROM {ddl.DEAD_LETTER} WHERE id = ?", (ident,))


class DeadLetters:
    """The applier's part for what can never apply here: kept in the dead-letter table with its
    reason, inside the applier's transaction, while the rest of the stream goes on."""

    def message(self, conn: sqlite3.Connection, stream: str, seq: int, data: bytes,
                error: Exception, local_pk: Callable[[str], tuple[str, ...] | None]) -> str:
        """A whole message that is not a change batch; returns the reason to report, with what
        the message tells of its origin (``local_pk``: a local table's primary key)."""
        about = about_message(data, local_pk)
        record_message(conn, stream, seq, data, str(error), about)
        return f"{error} (node {about.origin}, table {about.table}, key {about.key})"

    def change(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch, index: int,
               error: Exception) -> None:
        """The change ``index`` of ``batch``, which failed with ``error``."""
        ch = batch.changes[index]
        reason = f"{type(error).__name__}: {error}"
        record_change(conn, stream, seq, batch, index, reason)
        log.error("change to table %r from node %d (%s sequence %d) cannot be applied "
                  "and was put in the dead-letter table: %s", ch.table, batch.node_id,
                  stream, seq, reason,
                  extra={"stream": stream, "sequence": seq, "table": ch.table})
