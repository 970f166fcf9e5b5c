"""The publisher against a real nats-server: exactly-once publishing across a crash."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from pathlib import Path
from typing import Any

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


def _bulk(tmp_path: Path, rows: int) -> tuple[Path, sqlite3.Connection]:
    """A database with ``rows`` rows written in one transaction (one batch), change capture on."""
    db = tmp_path / "d.db"
    conn = open_connection(db)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    install(conn)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO t VALUES (?, 'x')", [(i,) for i in range(rows)])
    conn.execute("COMMIT")
    return db, conn


def _last_id(headers: dict[str, str]) -> int:
    """The last change id in a message id (``node:epoch:first-last:shard``)."""
    return int(headers["Nats-Msg-Id"].split(":")[2].split("-")[1])


async def test_next_chunk_is_read_while_acknowledgements_are_awaited(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch of several chunks: the next chunk is read before the previous one's
    acknowledgement is in, and still goes out after it, every change once and in order."""
    rows, chunk = 450, 100
    db, conn = _bulk(tmp_path, rows)
    cfg, _ = parse_config({"db_path": str(db), "node_id": 5, "scan_max_changes": chunk})
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, cfg)
    # Per chunk, by where its read starts (the previous chunk's last id): its read began.
    began = {after: asyncio.Event() for after in range(0, rows, chunk)}
    loop = asyncio.get_running_loop()
    real_read = changelog.read_entries

    def read_entries(c: sqlite3.Connection, after: int, *args: Any, **kw: Any
                     ) -> list[changelog.Entry]:
        loop.call_soon_threadsafe(began[after].set)  # on the publisher's database thread
        return real_read(c, after, *args, **kw)

    monkeypatch.setattr(changelog, "read_entries", read_entries)
    real_publish = js.publish_async
    overlapped: dict[int, bool] = {}
    sent: list[int] = []

    async def publish_async(subject: str, payload: bytes, **kw: Any) -> asyncio.Future[Any]:
        last = _last_id(kw["headers"])
        sent.append(last)
        fut = await real_publish(subject, payload, **kw)
        if last == rows:
            return fut

        async def held() -> Any:
            # The acknowledgement is held back until the next chunk's read began (or 1 s, well
            # below the publisher's acknowledgement timeout, has passed).
            with contextlib.suppress(TimeoutError):  # recorded as not read ahead
                await asyncio.wait_for(began[last].wait(), 1.0)
            overlapped[last] = began[last].is_set()
            return await fut

        return asyncio.ensure_future(held())

    monkeypatch.setattr(js, "publish_async", publish_async)
    dbt = DbThread(db, "pub")
    assert await Publisher(cfg, dbt, js, "e1").flush() == rows
    assert overlapped == {100: True, 200: True, 300: True, 400: True}
    assert sent == [100, 200, 300, 400, 450]  # each chunk sent once, in order
    (stream,) = namespace(cfg).streams()
    assert await stream_changes(js, stream) == [(i, "x") for i in range(rows)]
    assert changelog.pending_count(conn) == 0
    dbt.close()
    await nc.close()


async def test_failed_chunk_drops_the_one_read_ahead_and_resends_the_batch_in_order(
    tmp_path: Path, nats_server: NatsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's acknowledgement fails after the next chunk was read: the batch goes out again
    from the watermark, cut the same way, so JetStream drops the copies and every change is
    stored once, in order."""
    rows = 450
    db, conn = _bulk(tmp_path, rows)
    cfg, _ = parse_config({"db_path": str(db), "node_id": 5, "scan_max_changes": 100})
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    await ensure_streams(js, cfg)
    real_publish = js.publish_async
    failed: list[int] = []

    async def publish_async(subject: str, payload: bytes, **kw: Any) -> asyncio.Future[Any]:
        fut = await real_publish(subject, payload, **kw)
        if _last_id(kw["headers"]) == 300 and not failed:
            failed.append(300)
            await fut  # stored, but the publisher hears of a failure
            lost: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            lost.set_exception(RuntimeError("acknowledgement lost"))
            return lost
        return fut

    monkeypatch.setattr(js, "publish_async", publish_async)
    dbt = DbThread(db, "pub")
    publisher = Publisher(cfg, dbt, js, "e1")
    with pytest.raises(RuntimeError, match="acknowledgement lost"):
        await publisher.flush()
    assert changelog.watermark(conn) == 0
    assert await publisher.flush() == rows
    (stream,) = namespace(cfg).streams()
    assert await stream_changes(js, stream) == [(i, "x") for i in range(rows)]
    assert changelog.pending_count(conn) == 0
    dbt.close()
    await nc.close()
