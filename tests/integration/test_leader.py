"""Snapshot leader election, fencing, the upload lock and scheduling, on a real nats-server.

The first tests drive the lease and the scheduler in-process (two elections on two connections,
a store whose upload can be held at a gate); the others run real node processes sharing one
``file`` store and read the outcome from the store and the logs.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.errors import KeyNotFoundError

from harmonylite.bus.names import LEASE_KEY, LOCK_KEY
from harmonylite.bus.names import LEGACY_LEASE_BUCKET as BUCKET
from harmonylite.cdc.install import install
from harmonylite.cli import snapshot as cli
from harmonylite.config import Config, parse_config
from harmonylite.errors import LeaseLost
from harmonylite.snapshot.leader import LeaderElection
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.snapshot.scheduler import Scheduler
from harmonylite.storage.base import ObjectInfo
from harmonylite.storage.file import FileStore
from nodes import NodeProc, wait_until, write_toml
from servers import NatsServer, free_port

TTL_MS = 3000
HEARTBEAT = 1.0
SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)"


# --- in-process helpers ---------------------------------------------------------------------

def make_cfg(tmp_path: Path, **snap: Any) -> Config:
    db = tmp_path / "app.db"
    if not db.exists():
        conn = sqlite3.connect(str(db), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute(SCHEMA)
        install(conn)
        conn.executemany("INSERT INTO items(name) VALUES (?)", [(f"row {i}",) for i in range(200)])
        conn.close()
    data = {"store": "file", "file": {"path": str(tmp_path / "store")}, "leader_ttl": TTL_MS,
            "keep": 100} | snap
    cfg, _ = parse_config({"db_path": str(db), "node_id": 1, "snapshot": data})
    return cfg


class GatedStore(FileStore):
    """A file store whose uploads of data objects wait at a gate the test opens."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.waiting = asyncio.Event()

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        self.waiting.set()
        await self.gate.wait()
        return await super().upload(key, path)


async def until(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def connection(server: NatsServer) -> AsyncIterator[Any]:
    nc = await nats.connect(server.url)
    try:
        yield nc
    finally:
        await nc.close()


# --- in-process tests -----------------------------------------------------------------------

async def test_lease_is_compare_and_swap_and_the_fence_checks_the_revision(
    nats_server: NatsServer,
) -> None:
    async with connection(nats_server) as nc1, connection(nats_server) as nc2:
        e1 = LeaderElection(nc1.jetstream(), 1, TTL_MS, bucket=BUCKET, nc=nc1)
        e2 = LeaderElection(nc2.jetstream(), 2, TTL_MS, bucket=BUCKET, nc=nc2)
        assert (e1.heartbeat, e1.op_timeout) == (1.0, 0.5)
        assert await e1.tick() and e1.is_leader and e1.term == 1
        assert await e2.tick() and not e2.is_leader and e2.holder == 1
        # The bucket: max_age is the lease TTL, one value per key, no limit markers.
        info = await nc1.jetstream().stream_info(f"KV_{BUCKET}")
        assert info.config.max_age == pytest.approx(TTL_MS / 1000)
        assert info.config.max_msgs_per_subject == 1
        assert not getattr(info.config, "subject_delete_marker_ttl", None)
        entry = await (await nc1.jetstream().key_value(BUCKET)).get(LEASE_KEY)
        assert json.loads(entry.value)["node_id"] == 1
        await e1.confirm(1)  # still ours: renews
        assert await e1.tick() and e1.is_leader  # renew at the new revision

        # Someone else writes the key (the lease expired and was taken meanwhile).
        kv = await nc2.jetstream().key_value(BUCKET)
        await kv.put(LEASE_KEY, b'{"node_id": 9}')
        with pytest.raises(LeaseLost):
            await e1.confirm(1)
        assert not e1.is_leader
        with pytest.raises(LeaseLost):
            await e1.confirm(1)  # a new term would not help an old snapshot either
        await kv.delete(LEASE_KEY)
        assert await e2.tick() and e2.is_leader
        assert await e1.tick() and not e1.is_leader and e1.holder == 2

        # Graceful release deletes the key at our revision; the other takes it at once.
        await e2.release()
        assert not e2.is_leader
        with pytest.raises(KeyNotFoundError):
            await kv.get(LEASE_KEY)
        assert await e1.tick() and e1.is_leader and e1.term == 2

        # The bucket deleted under a running leader (an operator changing its TTL): the leader
        # steps down, and the next heartbeat recreates it and leads again.
        await nc2.jetstream().delete_key_value(BUCKET)
        assert not await e1.tick() and not e1.is_leader
        assert await e1.tick() and e1.is_leader and e1.term == 3
        await e1.release()


async def test_lease_lost_mid_upload_aborts_the_commit(
    tmp_path: Path, nats_server: NatsServer,
) -> None:
    cfg = make_cfg(tmp_path)
    store = GatedStore(tmp_path / "store")
    async with connection(nats_server) as nc, connection(nats_server) as other:
        election = LeaderElection(nc.jetstream(), 1, TTL_MS, bucket=BUCKET, nc=nc)
        assert await election.tick() and election.is_leader
        term = election.term
        save = asyncio.create_task(
            SnapshotPipeline(cfg, store).save(fence=lambda: election.confirm(term)))
        await asyncio.wait_for(store.waiting.wait(), 30)
        # While the data object uploads, the lease goes to another node.
        kv = await other.jetstream().key_value(BUCKET)
        await kv.delete(LEASE_KEY)
        await kv.create(LEASE_KEY, b'{"node_id": 2}')
        store.gate.set()
        with pytest.raises(LeaseLost):
            await save
        assert not election.is_leader
        assert await list_snapshots(store) == []
        assert not list((tmp_path / "store").rglob("*.db*")), "the uploaded object was left"


async def test_overlapping_trigger_is_skipped_and_the_lock_is_taken(
    tmp_path: Path, nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    cfg = make_cfg(tmp_path, interval=300)
    store = GatedStore(tmp_path / "store")
    stop = asyncio.Event()
    async with connection(nats_server) as nc, connection(nats_server) as watcher:
        js = nc.jetstream()
        election = LeaderElection(js, 1, TTL_MS, bucket=BUCKET, nc=nc)

        async def opener() -> GatedStore:
            return store

        sched = Scheduler(cfg, election, opener, js=js)
        election._on_change = sched.leadership_changed
        tasks = [asyncio.create_task(election.run(stop)), asyncio.create_task(sched.run(stop))]
        try:
            await asyncio.wait_for(store.waiting.wait(), 30)  # first snapshot: store was empty
            kv = await watcher.jetstream().key_value(BUCKET)
            held = json.loads((await kv.get(LOCK_KEY)).value)
            assert held["node_id"] == 1 and held["purpose"] == "leader"
            await until(lambda: "system busy capturing snapshot" in caplog.text, 10,
                        "an interval trigger to be skipped")
            assert "interval trigger queued" in caplog.text
            # a change applied meanwhile: the next snapshot has a new position to claim
            conn = sqlite3.connect(cfg.db_path, isolation_level=None)
            conn.execute("INSERT INTO __harmonylite__seq(stream, seq) VALUES "
                         "('harmonylite-changes-c-1', 1)")
            conn.close()
            store.gate.set()
            await until(lambda: len(sched.saved) >= 2, 20, "two snapshots")
        finally:
            stop.set()
            await asyncio.gather(*tasks)
            await sched.close()
            await election.release()
        committed = await list_snapshots(store)
        assert len(committed) >= 2
        with pytest.raises(KeyNotFoundError):
            await kv.get(LOCK_KEY)  # released after each upload


async def test_manual_save_exits_75_while_the_upload_lock_is_held(
    tmp_path: Path, nats_server: NatsServer,
) -> None:
    cfg = make_cfg(tmp_path)

    @asynccontextmanager
    async def js_context() -> AsyncIterator[Any]:
        async with connection(nats_server) as nc:
            yield nc.jetstream()

    out, err = io.StringIO(), io.StringIO()
    assert await cli.run(cfg, ["save"], js_context=js_context, stdout=out, stderr=err) == 0, \
        err.getvalue()
    async with connection(nats_server) as nc:
        kv = await nc.jetstream().key_value(BUCKET)
        with pytest.raises(KeyNotFoundError):
            await kv.get(LOCK_KEY)  # the save released its lock
        await kv.create(LOCK_KEY, b'{"node_id": 3, "purpose": "leader"}')
        out, err = io.StringIO(), io.StringIO()
        code = await cli.run(cfg, ["save"], js_context=js_context, stdout=out, stderr=err)
        assert code == 75 and "system busy capturing snapshot" in err.getvalue()
        assert "node 3" in err.getvalue() and out.getvalue() == ""
        # The real command line, as an operator runs it. Its start may take longer than the
        # lock's TTL on a busy machine: the holder renews the lock meanwhile, as a leader does.
        async def hold() -> None:
            while True:
                await kv.put(LOCK_KEY, b'{"node_id": 3, "purpose": "leader"}')
                await asyncio.sleep(TTL_MS / 3000)

        holder = asyncio.create_task(hold())
        conf = tmp_path / "cli.toml"
        write_toml(conf, {"db_path": cfg.db_path, "node_id": 1, "nats": {"urls": [
            nats_server.url]}, "snapshot": {"store": "file", "file": {"path": str(
                tmp_path / "store")}, "leader_ttl": TTL_MS}})
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "harmonylite", "-config", str(conf), "-save-snapshot",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        finally:
            holder.cancel()
        assert proc.returncode == 75, stderr.decode()
        assert b"system busy capturing snapshot" in stderr and stdout == b""
        assert len(await list_snapshots(FileStore(tmp_path / "store"))) == 1


# --- node processes -------------------------------------------------------------------------

LINE_TIME = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) ")


@dataclass
class Event:
    at: float  # seconds since local midnight, from the log line
    kind: str  # "became", "lost", "released"
    line: str


def events(node: NodeProc) -> list[Event]:
    out = []
    for line in node.log_text().splitlines():
        kind = ("became" if "Became snapshot leader" in line else
                "lost" if "Lost snapshot leadership" in line else
                "released" if "Released snapshot leadership" in line else None)
        m = LINE_TIME.match(line)
        if kind and m:
            h, mi, s, ms = map(int, m.groups())
            out.append(Event(h * 3600 + mi * 60 + s + ms / 1000, kind, line))
    return out


def is_leader(node: NodeProc) -> bool:
    if node.proc is None or node.proc.poll() is not None:
        return False
    ev = events(node)
    return bool(ev) and ev[-1].kind == "became"


def leaders(nodes: list[NodeProc]) -> list[int]:
    return [n.node_id for n in nodes if is_leader(n)]


@dataclass
class Committed:
    id: str
    node_id: int
    started: float  # created_at (the capture start), Unix time
    committed: float  # the manifest's mtime: when it was written
    sequences: dict[str, int]


def committed(store: Path) -> list[Committed]:
    out = []
    for path in (store / "snapshots").glob("*.json"):
        try:
            data = json.loads(path.read_text())
            mtime = path.stat().st_mtime
        except (OSError, ValueError):
            continue
        started = datetime.fromisoformat(data["created_at"].replace("Z", "+00:00")).timestamp()
        out.append(Committed(data["id"], data["node_id"], started, mtime, data["sequences"]))
    return sorted(out, key=lambda c: c.started)


def assert_no_overlapping_commits(store: Path) -> None:
    snaps = committed(store)
    for a, b in pairwise(snaps):
        assert a.committed <= b.started, (
            f"capture windows overlap: {a.id} ({a.started:.3f}..{a.committed:.3f}) and "
            f"{b.id} ({b.started:.3f}..{b.committed:.3f})")


def node_cfg(url: str, store: Path, **snap: Any) -> dict[str, Any]:
    return {"nats": {"urls": [url], "reconnect_wait_seconds": 1},
            "snapshot": {"enabled": True, "store": "file", "interval": 1000,
                         "leader_ttl": TTL_MS, "keep": 1000, "file": {"path": str(store)}, **snap}}


def start_nodes(tmp_path: Path, urls: list[str], store: Path, **extra: Any) -> list[NodeProc]:
    nodes = []
    snap = extra.pop("snapshot", {})
    for i, url in enumerate(urls, 1):
        node = NodeProc(tmp_path / f"node{i}", i, {**node_cfg(url, store, **snap), **extra})
        node.execute(SCHEMA)
        nodes.append(node)
    for node in nodes:
        node.start_async()
    for node in nodes:
        node.wait_started()
    return nodes


@pytest.fixture
def quiet_procs() -> Iterator[list[NodeProc]]:
    started: list[NodeProc] = []
    yield started
    for node in started:
        node.stop(signal.SIGKILL)


@pytest.fixture
def procs() -> Iterator[list[NodeProc]]:
    """Nodes a test started (killed at the end), with the application writing a row every
    0.2 s on the first running one: a leader takes no snapshot identical in position to the
    newest, so the positions must move for snapshots to keep coming."""
    started: list[NodeProc] = []
    done = threading.Event()

    def write() -> None:
        n = 0
        while not done.wait(0.2):
            alive = [p for p in started if p.proc is not None and p.proc.poll() is None]
            if alive:
                n += 1
                alive[0].execute("INSERT INTO items(name) VALUES (?)", (f"app {n}",))

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    yield started
    done.set()
    writer.join(10)
    for node in started:
        node.stop(signal.SIGKILL)


def test_one_leader_uploads_failover_on_kill_and_handover_on_stop(
    tmp_path: Path, nats_server: NatsServer, procs: list[NodeProc],
) -> None:
    store = tmp_path / "store"
    nodes = start_nodes(tmp_path, [nats_server.url] * 3, store)
    procs.extend(nodes)
    wait_until(lambda: len(leaders(nodes)) == 1, 15, "one leader")
    first = leaders(nodes)[0]
    # Stable over several heartbeats, and only it uploads (interval trigger: every second).
    wait_until(lambda: len(committed(store)) >= 3, 20, "three snapshots")
    for _ in range(30):
        assert leaders(nodes) == [first]
        time.sleep(0.1)  # observing stability over three heartbeats, not waiting for an event
    snaps = committed(store)
    assert {s.node_id for s in snaps} == {first}
    gaps = [b.started - a.started for a, b in pairwise(snaps)]
    assert min(gaps) >= 0.9, gaps  # interval measured from the previous snapshot

    # SIGKILL the leader: another takes over within TTL + one heartbeat.
    victim = nodes[first - 1]
    killed_at = time.monotonic()
    victim.kill()
    rest = [n for n in nodes if n is not victim]
    wait_until(lambda: len(leaders(rest)) == 1, 10, "a new leader after the kill")
    failover = time.monotonic() - killed_at
    assert failover <= TTL_MS / 1000 + HEARTBEAT + 1.0, failover  # 1 s for a busy machine
    second = leaders(rest)[0]
    wait_until(lambda: any(s.node_id == second for s in committed(store)), 10,
               "a snapshot by the new leader")

    # Graceful stop: the lease is deleted and the last node takes it at once.
    leaving = nodes[second - 1]
    last = next(n for n in rest if n is not leaving)
    assert leaving.stop() == 0
    wait_until(lambda: is_leader(last), 5, "the last node to lead")
    released = [e for e in events(leaving) if e.kind == "released"]
    assert released, leaving.log_text()[-2000:]
    became = [e for e in events(last) if e.kind == "became"][-1]
    handover = became.at - released[-1].at
    assert handover < 0.5, handover
    print(f"failover after SIGKILL: {failover:.2f} s; handover after stop: {handover:.3f} s")
    assert_no_overlapping_commits(store)


def test_nats_outage_means_no_leader_and_no_snapshot_then_one_leader_again(
    tmp_path: Path, nats_server: NatsServer, procs: list[NodeProc],
) -> None:
    store = tmp_path / "store"
    nodes = start_nodes(tmp_path, [nats_server.url] * 2, store)
    procs.extend(nodes)
    wait_until(lambda: len(leaders(nodes)) == 1 and len(committed(store)) >= 1, 15,
               "a leader and a snapshot")
    stopped_at = time.time()
    nats_server.stop()
    wait_until(lambda: leaders(nodes) == [], HEARTBEAT + 1.0, "every node to step down")
    lost = [e for n in nodes for e in events(n) if e.kind == "lost"]
    assert lost and ("NATS disconnected" in lost[-1].line or "timed out" in lost[-1].line)
    # Nothing is committed while NATS is gone (a capture in flight fails its fence).
    down_until = time.monotonic() + 2 * TTL_MS / 1000
    while time.monotonic() < down_until:
        assert leaders(nodes) == []
        time.sleep(0.1)  # observing the outage for two TTLs
    restarted_at = time.time()
    assert not [s for s in committed(store) if stopped_at + 0.05 < s.committed < restarted_at]
    nats_server.start()
    wait_until(lambda: len(leaders(nodes)) == 1, 20, "one leader after NATS returned")
    count = len(committed(store))
    wait_until(lambda: len(committed(store)) > count, 10, "snapshots to resume")
    for node in nodes:
        text = node.log_text()
        assert "Traceback" not in text, text[-3000:]
    assert_no_overlapping_commits(store)


def test_message_count_trigger_and_sleep_timeout(
    tmp_path: Path, nats_server: NatsServer, quiet_procs: list[NodeProc],
) -> None:
    procs = quiet_procs  # this test counts the messages itself
    store = tmp_path / "store"
    nodes = start_nodes(tmp_path, [nats_server.url], store, sleep_timeout=4000,
                        replication_log={"max_entries": 8, "shards": 1},
                        snapshot={"interval": 0})
    procs.extend(nodes)
    node = nodes[0]
    wait_until(lambda: is_leader(node), 10, "the node to lead")
    assert committed(store) == []  # interval 0: no timer; nothing written yet

    def applied() -> int:
        rows = node.query("SELECT max(seq) FROM __harmonylite__seq")
        return int(rows[0][0] or 0)

    for i in range(10):  # one stream message each: wait until the node applied it
        before = applied()
        node.execute("INSERT INTO items(name) VALUES (?)", (f"n{i}",))
        wait_until(lambda: applied() > before, 10, f"message {i + 1} to be applied")  # noqa: B023
    wait_until(lambda: len(committed(store)) >= 1, 15, "a snapshot after 4 messages")
    first = committed(store)[0]
    assert max(first.sequences.values()) >= 4
    # the trigger: half of max_entries on any stream (the stream keeps 8)
    assert "taking a snapshot (4 messages on" in node.log_text()
    # Then nothing happens: after sleep_timeout the leader takes a final snapshot and exits 0.
    assert node.proc is not None
    code = node.proc.wait(30)
    assert code == 0
    text = node.log_text()
    assert "sleep_timeout" in text and "taking a snapshot (sleep timeout)" in text
    # (its final snapshot is skipped when nothing moved since the newest: no identical copies)
    assert len(committed(store)) >= 1
    assert "Released snapshot leadership" in text


# --- latency between a node and NATS --------------------------------------------------------

class SlowProxy:
    """A TCP proxy to nats-server that delays every byte by ``delay`` seconds (order kept)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> SlowProxy:
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in others:
            t.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", self.port))
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer),
                             return_exceptions=True)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)  # the injected latency itself
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.create_task(send())
        try:
            while data := await reader.read(65536):
                queue.put_nowait((time.monotonic() + self.delay, data))
            queue.put_nowait((0.0, b""))
            await sender
        finally:
            sender.cancel()
            writer.close()


def test_latency_above_the_ttl_flaps_leadership_but_never_two_commits(
    tmp_path: Path, nats_server: NatsServer, procs: list[NodeProc],
) -> None:
    proxies = [SlowProxy(nats_server.port).start() for _ in range(2)]
    try:
        store = tmp_path / "store"
        nodes = start_nodes(tmp_path, [p.url for p in proxies], store,
                            snapshot={"interval": 500})
        procs.extend(nodes)
        wait_until(lambda: len(leaders(nodes)) == 1, 15, "one leader")
        for _round in range(3):
            leader = leaders(nodes)[0]
            other = next(n for n in nodes if n.node_id != leader)
            proxies[leader - 1].delay = TTL_MS / 1000 + 1.0  # KV calls slower than the TTL

            def other_leads(o: NodeProc = other) -> bool:
                return is_leader(o)

            def other_saved(o: NodeProc = other, since: float = time.time()) -> bool:
                return any(s.node_id == o.node_id and s.started > since for s in committed(store))

            wait_until(other_leads, 3 * TTL_MS / 1000 + 4, "the other node to lead")
            proxies[leader - 1].delay = 0.0
            wait_until(other_saved, 10, "a snapshot by the new leader")
        lost = sum(1 for n in nodes for e in events(n) if e.kind == "lost")
        became = sum(1 for n in nodes for e in events(n) if e.kind == "became")
        assert lost >= 3 and became >= 4, (lost, became)
        for node in nodes:
            for e in events(node):
                assert f"[node {node.node_id}]" in e.line  # the node id is on every line
        assert len({s.node_id for s in committed(store)}) == 2
        assert_no_overlapping_commits(store)
    finally:
        for p in proxies:
            p.stop()

