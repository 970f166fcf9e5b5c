"""The publisher against a real nats-server: exactly-once publishing across a crash."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import pytest

from harmonylite.bus.names import namespace
from harmonylite.bus.streams import ensure_streams
from harmonylite.cdc import changelog
from harmonylite.cdc.install import install
from harmonylite.config import parse_config
from harmonylite.db.connection import DbThread, open_connection
from harmonylite.replication.event import decode
from harmonylite.replication.publisher import Publisher
from servers import NatsServer


async def stream_changes(js: nats.js.JetStreamContext, stream: str) -> list[tuple[object, ...]]:
    info = await js.stream_info(stream)
    out: list[tuple[object, ...]] = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.extend(ch.values for ch in decode(msg.data or b"").changes)
    return out


async def test_crash_between_ack_and_mark_publishes_nothing_twice(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "d.db"
    conn = open_connection(db)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    install(conn)
    for i in range(10):
        conn.execute("INSERT INTO t VALUES (?, 'first')", (i,))
    cfg, _ = parse_config({"db_path": str(db), "node_id": 5, "scan_max_changes": 100,
                           "replication_log": {"shards": 3}})
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, cfg)

    def crash(_conn: object, _upto: int) -> None:
        raise RuntimeError("process died after the acknowledgement")

    dbt = DbThread(db, "pub")
    monkeypatch.setattr(changelog, "mark_published", crash)
    with pytest.raises(RuntimeError):
        await Publisher(cfg, dbt, js, "e1").flush()
    monkeypatch.undo()
    # The application went on writing while the node was down.
    for i in range(10, 15):
        conn.execute("INSERT INTO t VALUES (?, 'later')", (i,))
    restarted = Publisher(cfg, dbt, js, "e1")
    assert await restarted.flush() == 15
    stored = [v for s in namespace(cfg).streams() for v in await stream_changes(js, s)]
    assert sorted(stored) == sorted((i, "first" if i < 10 else "later") for i in range(15))
    assert changelog.pending_count(conn) == 0
    dbt.close()
    await nc.close()


async def test_commits_in_quick_succession_go_out_in_one_batch_per_pace(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    """Each batch opens with a write of the node's own (the application may wait behind it):
    an application committing every few milliseconds meets one such write per ``pace``, not one
    per commit of its own."""
    db = tmp_path / "d.db"
    conn = open_connection(db)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    install(conn)
    conn.close()
    cfg, _ = parse_config({"db_path": str(db), "node_id": 5})
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, cfg)
    dbt = DbThread(db, "pub")
    pace = 0.05
    publisher = Publisher(cfg, dbt, js, "e1", pace=pace)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    task = asyncio.create_task(publisher.run(stop))
    rows = 300

    def application() -> float:
        """Single-row commits 2 ms apart, each waking the publisher at once (as a watcher
        polling without pause would); returns the seconds they took."""
        app = open_connection(db)
        t0 = time.monotonic()
        for i in range(rows):
            app.execute("INSERT INTO t VALUES (?, 'x')", (i,))
            loop.call_soon_threadsafe(publisher.wake.set)
            time.sleep(0.002)  # the application's pace, not a synchronisation
        app.close()
        return time.monotonic() - t0

    took = await asyncio.to_thread(application)
    deadline = time.monotonic() + 60
    while publisher.published_total < rows:
        assert time.monotonic() < deadline, f"published {publisher.published_total} of {rows}"
        await asyncio.sleep(0.01)
    stop.set()
    publisher.wake.set()
    await task
    (stream,) = namespace(cfg).streams()
    info = await js.stream_info(stream)
    stored = await stream_changes(js, stream)
    assert sorted(stored) == [(i, "x") for i in range(rows)]
    # Batches open at most once per pace (plus the first and the last one).
    assert info.state.messages <= took / pace + 3, (info.state.messages, took)
    dbt.close()
    await nc.close()
