"""The resolution rule as a property: the same per-stream message sequences, applied in any
interleaving of the streams, give the same final rows (conflicts recorded alike).

Rows of a table without a secondary UNIQUE constraint go to the stream of their key, so streams
interleave freely; a table with one goes to a single stream. Real SQLite files, the real applier.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.install import install
from harmonylite.db.connection import open_connection
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import encode, shard_of

SCHEMA = ("CREATE TABLE kv(k INTEGER PRIMARY KEY, v TEXT);"
          "CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, n INTEGER)")
SHAPES = {"kv": TableShape("kv", ("k", "v"), ("k",)),
          "users": TableShape("users", ("id", "email", "n"), ("id",), single_order=True)}
SHARDS = 3

write = st.one_of(
    st.tuples(st.just("kv"), st.sampled_from([1, 3]), st.integers(0, 5), st.text(max_size=3)),
    st.tuples(st.just("users"), st.sampled_from([1, 3]), st.integers(0, 4),
              st.sampled_from(["a@x", "b@x", "c@x", None])),
)


def stream_messages(writes: list[tuple[str, int, int, object]]
                    ) -> dict[int, list[bytes]]:
    """Each write as one message of its origin, in the stream its row goes to."""
    streams: dict[int, list[bytes]] = {}
    for i, (table, op, key, value) in enumerate(writes, start=1):
        shape = SHAPES[table]
        values: tuple[object, ...] = (key, value) if table == "kv" else (key, value, i)
        if op == 3:
            values = (key, None) if table == "kv" else (key, None, None)
        shard = shard_of(table, [] if shape.single_order else [key], SHARDS)
        node = 1 + i % 2
        payload = encode(node, [Change(i, table, op, values)], SHAPES, False, f"e{node}")
        streams.setdefault(shard, []).append(payload)
    return streams


def apply_interleaved(path: Path, streams: dict[int, list[bytes]], order: list[int]
                      ) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]], int]:
    conn = open_connection(path)
    for stmt in SCHEMA.split(";"):
        conn.execute(stmt)
    install(conn)
    applier = Applier()
    cursor = dict.fromkeys(streams, 0)
    for shard in order:  # take the next message of that stream, if any is left
        if shard in streams and cursor[shard] < len(streams[shard]):
            cursor[shard] += 1
            applier.apply(conn, f"s-{shard}", [(cursor[shard], streams[shard][cursor[shard] - 1])])
    for shard, msgs in streams.items():  # and the rest, stream by stream
        for seq in range(cursor[shard] + 1, len(msgs) + 1):
            applier.apply(conn, f"s-{shard}", [(seq, msgs[seq - 1])])
    out = (conn.execute("SELECT * FROM kv ORDER BY k").fetchall(),
           conn.execute("SELECT * FROM users ORDER BY id").fetchall(),
           conn.execute("SELECT count(*) FROM __harmonylite__conflicts").fetchone()[0])
    conn.close()
    return out


@settings(max_examples=60, deadline=None)
@given(writes=st.lists(write, min_size=1, max_size=25),
       orders=st.lists(st.lists(st.integers(1, SHARDS), max_size=60), min_size=2, max_size=3))
def test_any_interleaving_of_the_streams_gives_the_same_rows(
        writes: list[tuple[str, int, int, object]], orders: list[list[int]]) -> None:
    streams = stream_messages(writes)
    with tempfile.TemporaryDirectory() as d:
        results = [apply_interleaved(Path(d) / f"n{i}.db", streams, order)
                   for i, order in enumerate(orders)]
    assert all(r == results[0] for r in results[1:]), results
    kv, users, _ = results[0]
    emails = [u[1] for u in users if u[1] is not None]
    assert len(emails) == len(set(emails))  # the UNIQUE constraint held everywhere
    assert all(isinstance(r, tuple) for r in kv)

