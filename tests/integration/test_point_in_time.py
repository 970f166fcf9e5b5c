"""Point-in-time restores from the archive equal an oracle of what was committed when.

Three real nodes (two shards, the archive on, a file store) take writes on every node while the
store goes away for a while, and the snapshot leader is SIGKILLed (the lease, and the archive,
move to another node) and started again. Each writer records every committed transaction with
its commit time. A restore to a time T must then hold, per writing node, exactly a prefix of its
transactions (each whole: never part of one), with every transaction published well before T in
it and none committed after T. The module shares one history between its tests.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyrage
import pytest

from harmonylite.age_keys import load_keys
from harmonylite.archive import catalog
from harmonylite.archive.segment import us_to_rfc3339
from harmonylite.replication.event import BATCH_HEADER, ORIGIN_HEADER, SHARDS_HEADER
from harmonylite.restore import point_in_time as pitr
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.storage import SealedStore
from harmonylite.storage.file import FileStore
from harmonylite.storage.sealed import MAGIC
from nodes import NodeProc, health, wait_until
from servers import NatsServer, free_port

ROWS_PER_TXN = 4
SLACK = 5.0  # seconds a committed transaction may take to be published (a loaded machine)
STREAMS = ["harmonylite-changes-c-1", "harmonylite-changes-c-2"]
SCHEMA = ("CREATE TABLE items(id TEXT PRIMARY KEY, node INTEGER, txn INTEGER, v INTEGER)",
          "CREATE TABLE last(node INTEGER PRIMARY KEY, txn INTEGER)")


@dataclass
class Writer:
    node: NodeProc
    commits: list[float] = field(default_factory=list)  # commit time of transaction j at j-1
    # Transactions that may have gone out late (their node was killed before publishing them):
    # (first, last) index range and the time from which they may be published.
    late: list[tuple[int, int, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        conn = sqlite3.connect(self.node.db, isolation_level=None, timeout=30)
        n = self.node.node_id
        try:
            while not self.stop.is_set():
                j = len(self.commits) + 1
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?)",
                                 [(f"{n}-{j}-{i}", n, j, i) for i in range(ROWS_PER_TXN)])
                conn.execute("DELETE FROM items WHERE id = ?", (f"{n}-{j - 2}-0",))
                conn.execute("INSERT INTO last VALUES (?, ?) ON CONFLICT(node) DO UPDATE "
                             "SET txn = excluded.txn", (n, j))
                conn.execute("COMMIT")
                self.commits.append(time.time())
                self.stop.wait(0.05)
        finally:
            conn.close()

    def latest(self, j: int) -> float:
        """When transaction j was surely published."""
        at = self.commits[j - 1]
        for first, last, since in self.late:
            if first <= j <= last:
                at = max(at, since)
        return at + SLACK


def expected_items(n: int, k: int) -> set[tuple[str, int, int, int]]:
    return {(f"{n}-{j}-{i}", n, j, i) for j in range(1, k + 1) for i in range(ROWS_PER_TXN)
            if not (i == 0 and j <= k - 2)}


@dataclass
class History:
    nodes: list[NodeProc]
    writers: list[Writer]
    store: Path
    tmp: Path


def node_config(store: Path, nats_url: str, identity: Path, public: str) -> dict[str, Any]:
    return {"nats": {"urls": [nats_url]}, "replication_log": {"shards": 2},
            "snapshot": {"store": "file", "file": {"path": str(store)}, "interval": 2000,
                         "leader_ttl": 3000, "archive": True, "archive_interval": 300,
                         # Sealed at rest: segments go through the same wrapper as snapshots.
                         "encryption": {"recipients": [public],
                                        "identity_file": str(identity)}},
            "health_check": {"enable": True, "bind": f"127.0.0.1:{free_port()}"}}


def leader(nodes: list[NodeProc]) -> NodeProc | None:
    for n in nodes:
        if n.proc is not None and health(n)[1].get("archive", {}).get("writing"):
            return n
    return None


def sealed(store: Path) -> SealedStore:
    identity = store.parent / "age-identity.txt"
    keys = load_keys([], str(identity)) if identity.exists() else None
    return SealedStore(FileStore(str(store)), keys)


def archive_state(store: Path) -> tuple[catalog.Window, dict[str, catalog.StreamArchive]]:
    async def read() -> tuple[catalog.Window, dict[str, catalog.StreamArchive]]:
        fs = sealed(store)
        archives = await catalog.list_archive(fs, STREAMS)
        return catalog.window(await list_snapshots(fs), archives), archives
    return asyncio.run(read())


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[History]:
    tmp = tmp_path_factory.mktemp("pitr")
    nats = NatsServer(tmp / "nats").start()
    store = tmp / "store"
    key = pyrage.x25519.Identity.generate()
    identity = tmp / "age-identity.txt"
    identity.write_text(f"{key}\n")
    identity.chmod(0o600)
    nodes = []
    for i in (1, 2, 3):
        node = NodeProc(tmp / f"n{i}", i, node_config(store, nats.url, identity,
                                                      str(key.to_public())))
        for stmt in SCHEMA:
            node.execute(stmt)
        nodes.append(node.start())
    writers = [Writer(n) for n in nodes]
    threads = [threading.Thread(target=w.run, daemon=True) for w in writers]
    try:
        wait_until(lambda: leader(nodes) is not None, 60, "an archive writer")
        for t in threads:
            t.start()
        time.sleep(2)  # writes go on; nothing to wait for (the workload's own pace)
        # A store outage while archiving: the store's directory becomes a file.
        aside = tmp / "store-aside"
        store.rename(aside)
        store.write_text("not a directory")
        time.sleep(3)  # the outage's length
        store.unlink()
        aside.rename(store)
        # The leader (and archive writer) is SIGKILLed while every node writes.
        victim = leader(nodes)
        assert victim is not None
        writer = writers[nodes.index(victim)]
        first_late = len(writer.commits) + 1
        victim.kill()
        wait_until(lambda: leader([n for n in nodes if n is not victim]) is not None, 60,
                   "another node to take over the archive")
        victim.start()
        writer.late.append((max(1, first_late - int(SLACK * 20) - 5), 10**9, time.time()))
        time.sleep(3)
        for w in writers:
            w.stop.set()
        for t in threads:
            t.join(30)
        last_commit = max(c for w in writers for c in w.commits)
        wait_until(lambda: archive_state(store)[0].end_us / 1e6 > last_commit + SLACK, 90,
                   "the archive to cover the last commit")
        yield History(nodes, writers, store, tmp)
    finally:
        for w in writers:
            w.stop.set()
        for n in nodes:
            n.stop()
        nats.stop()


def check(db: Path, writers: list[Writer], t: float, *, installed: bool = False) -> list[int]:
    """The restored database holds a whole prefix of each node's transactions, within bounds."""
    conn = sqlite3.connect(db)
    try:
        last = dict(conn.execute("SELECT node, txn FROM last").fetchall())
        items = set(conn.execute("SELECT id, node, txn, v FROM items").fetchall())
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    # A file written with --output is sanitized; a node's database keeps its capture.
    assert installed == any(name.startswith("__harmonylite__") for name in tables)
    prefixes = []
    for w in writers:
        n = w.node.node_id
        k = int(last.get(n, 0))
        mine = {row for row in items if row[1] == n}
        assert mine == expected_items(n, k), f"node {n}: not a whole prefix of {k} transactions"
        must = max((j for j in range(1, len(w.commits) + 1) if w.latest(j) <= t), default=0)
        may = max((j for j, c in enumerate(w.commits, 1) if c <= t), default=0)
        assert must <= k <= may, f"node {n}: {k} transactions at {t}, expected {must}..{may}"
        prefixes.append(k)
    return prefixes


def test_restores_to_random_points_equal_the_oracle(history: History) -> None:
    node = history.nodes[0]
    win, archives = archive_state(history.store)
    assert win.start is not None
    commits = [c for w in history.writers for c in w.commits]
    rng = random.Random(24)
    points = sorted(rng.uniform(max(win.start_us / 1e6, min(commits)), max(commits) + 1)
                    for _ in range(4))
    seen = []
    for i, t in enumerate(points):
        out = history.tmp / f"at-{i}.db"
        when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        done = node.cli("snapshot", "restore", "--to-time", when, "--output", str(out))
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(out)
        assert "from snapshot p" in done.stderr and "archived messages" in done.stderr
        seen.append(check(out, history.writers, t))
    assert seen == sorted(seen) and seen[0] != seen[-1], seen  # later points hold more

    # A message of a stream as the point: that stream's message and everything before it.
    stream = STREAMS[1]
    ref = archives[stream].segments[len(archives[stream].segments) // 2]
    out = history.tmp / "at-seq.db"
    done = node.cli("snapshot", "restore", "--to-sequence", f"{stream}:{ref.last}",
                    "--output", str(out))
    assert done.returncode == 0, done.stderr
    check(out, history.writers, ref.last_us / 1e6)

    # A point inside a transaction that spans both streams: its part on the first stream is
    # before the point, its part on the second after it. It is left out whole.
    stream, seq, t = split_transaction(history.store)
    out = history.tmp / "mid-transaction.db"
    done = node.cli("snapshot", "restore", "--to-sequence", f"{stream}:{seq}", "--output",
                    str(out))
    assert done.returncode == 0, done.stderr
    assert "of transactions unfinished at that point left out" in done.stderr, done.stderr
    check(out, history.writers, t)

    # Outside the window: refused, naming the window.
    done = node.cli("snapshot", "restore", "--to-time", "2000-01-01T00:00:00Z", "--output",
                    str(history.tmp / "never.db"))
    assert done.returncode == 1 and "window" in done.stderr, done.stderr
    listing = node.cli("snapshot", "list")
    assert listing.returncode == 0 and "restorable window: " in listing.stderr, listing.stderr
    assert us_to_rfc3339(win.start_us)[:19] in listing.stderr


def test_a_stopped_node_rolled_back_in_place_stays_at_the_point(history: History) -> None:
    node = history.nodes[2]
    commits = sorted(c for w in history.writers for c in w.commits)
    t = commits[len(commits) // 2]
    when = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    node.stop()
    done = node.cli("snapshot", "restore", "--to-time", when)
    assert done.returncode == 0, done.stderr
    assert "positions at the streams' heads" in done.stderr, done.stderr
    at_point = check(node.db, history.writers, t, installed=True)
    node.start()
    wait_until(lambda: all(s["lag_messages"] == 0 for s in
                           health(node)[1].get("replication", {"-": {"lag_messages": 1}})
                           .values()), 60, "the node to follow the streams")
    # Nothing after the point came back: the node continues from the heads.
    assert check(node.db, history.writers, t, installed=True) == at_point


def split_transaction(store: Path) -> tuple[str, int, float]:
    """A message ending a batch on the first stream whose end on the second came later."""
    _, archives = archive_state(store)

    async def find() -> tuple[str, int, float]:
        segments = pitr.Segments(sealed(store))
        ends: dict[str, dict[tuple[str, str], tuple[int, int]]] = {s: {} for s in STREAMS}
        for s in STREAMS:
            for ref in archives[s].segments:
                for m in await segments.read(ref):
                    if m.headers.get(SHARDS_HEADER) == "1,2":
                        key = (m.headers[ORIGIN_HEADER], m.headers[BATCH_HEADER])
                        ends[s][key] = (m.seq, m.time_us)
        for key, (seq, t1) in sorted(ends[STREAMS[0]].items(), key=lambda kv: kv[1]):
            other = ends[STREAMS[1]].get(key)
            if other is not None and other[1] > t1:
                return STREAMS[0], seq, t1 / 1e6
        raise AssertionError("no transaction of both streams ended later on the second")
    return asyncio.run(find())


def test_verify_passes_then_names_a_gap_and_a_corrupt_segment(history: History) -> None:
    node = history.nodes[1]
    done = node.cli("archive", "verify")
    assert done.returncode == 0, done.stderr
    # A copy of the store, damaged: one segment's data changed, another's manifest gone.
    copy = history.tmp / "damaged"
    shutil.copytree(history.store, copy)
    segs = sorted((copy / "archive" / STREAMS[0]).glob("*.seg.zst"))
    assert all(s.read_bytes().startswith(MAGIC) for s in segs)  # sealed
    # Verify checks the way from the oldest kept snapshot on (older segments are no restore's
    # way and go with it): the damage is done there.
    oldest = asyncio.run(list_snapshots(sealed(copy)))[-1].sequences.get(STREAMS[0], 0)
    on_way = [s for s in segs if int(s.name.split("-")[1]) > oldest]
    assert len(on_way) >= 3
    data = bytearray(on_way[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    on_way[0].write_bytes(bytes(data))
    on_way[-2].with_name(on_way[-2].name.replace(".seg.zst", ".json")).unlink()
    config = node.config_path.read_text().replace(str(history.store), str(copy))
    damaged = history.tmp / "damaged.toml"
    damaged.write_text(config)
    done = _cli(damaged, "archive", "verify")
    assert done.returncode == 1
    assert f"corrupt segment archive/{STREAMS[0]}/{on_way[0].name}" in done.stderr, done.stderr
    assert f"archive gap in {STREAMS[0]}" in done.stderr, done.stderr


def _cli(config: Path, *args: str) -> Any:
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def test_a_stream_that_drops_unarchived_messages_is_a_reported_gap(tmp_path: Path) -> None:
    """The store is away while the only node writes past what its stream keeps, and the node
    (the archive writer) is killed meanwhile: the next writer finds the messages gone, says so
    (log, health), goes on from the stream's first message, and ``archive verify`` names it."""
    nats = NatsServer(tmp_path / "nats").start()
    store = tmp_path / "store"
    cfg = {"nats": {"urls": [nats.url]}, "replication_log": {"max_entries": 5},
           "snapshot": {"store": "file", "file": {"path": str(store)}, "interval": 0,
                        "leader_ttl": 3000, "archive": True, "archive_interval": 200},
           "health_check": {"enable": True, "bind": f"127.0.0.1:{free_port()}"}}
    node = NodeProc(tmp_path / "n1", 1, cfg)
    node.execute(SCHEMA[1])
    try:
        node.start()
        node.execute("INSERT INTO last VALUES (0, 0)")
        wait_until(lambda: archive_state(store)[1]["harmonylite-changes-c-1"].last >= 1, 60,
                   "the first segment")
        saved = node.cli("snapshot", "save")  # a snapshot before the gap: the history after
        assert saved.returncode == 0, saved.stderr  # it must be continuous
        aside = tmp_path / "store-aside"
        store.rename(aside)
        store.write_text("not a directory")  # the store is away
        def head() -> int:
            streams = health(node)[1].get("replication", {})
            return int(streams.get("harmonylite-changes-c-1", {}).get("stream_last_sequence", 0))

        for j in range(1, 21):  # one message each: the stream rolls over several times
            before = head()
            node.execute("INSERT INTO last VALUES (?, ?)", (j, j))
            wait_until(lambda b=before: head() > b, 30, f"write {j} to be published")
        wait_until(lambda: "not stored" in node.log_text(), 30, "a failed segment")

        def applied() -> int:
            streams = health(node)[1].get("replication", {})
            return int(streams.get("harmonylite-changes-c-1", {}).get("applied_sequence", 0))

        # The node itself applied everything (else it, not the archive, would miss messages).
        wait_until(lambda: applied() >= head() >= 21, 30, "the node to apply its own writes")
        node.kill()  # what the writer held is gone; the stream keeps only the last 5
        store.unlink()
        aside.rename(store)
        node.start()
        wait_until(lambda: "archive gap in harmonylite-changes-c-1" in node.log_text(), 60,
                   "the gap to be reported")
        wait_until(lambda: any("misses messages" in w for w in health(node)[1].get("warnings",
                                                                                    [])),
                   30, "the gap in health")
        # (Until the writer stores its first segment past the gap, the store holds nothing
        # after the snapshot: nothing for verify to find a hole between.)
        wait_until(lambda: any(r.first > 1 for r in
                               archive_state(store)[1]["harmonylite-changes-c-1"].segments),
                   60, "a segment after the gap")
        done = node.cli("archive", "verify", "--quick")
        assert done.returncode == 1
        assert "archive gap in harmonylite-changes-c-1: sequences 2.." in done.stderr, done.stderr
    finally:
        node.stop()
        nats.stop()
