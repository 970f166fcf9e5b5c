"""Replication never stops, never drops, never reverts (real nodes, real nats-server).

Each test is one way the node used to stop applying, lose rows or revert a newer write silently.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import cbor2
import nats
import pytest
from nats.js.api import DiscardPolicy, StorageType, StreamConfig

from nodes import NodeProc, stop_leftovers, wait_until
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, owner INTEGER, name TEXT, qty REAL)"
STREAM, SUBJECT = "harmonylite-changes-c-1", "harmonylite-change-log-1"


def node(tmp_path: Path, server: NatsServer, i: int, *, health: bool = False,
         env: dict[str, str] | None = None, **extra: Any) -> NodeProc:
    cfg: dict[str, Any] = {"nats": {"urls": [server.url]}, "cleanup_interval": 200, **extra}
    if health:
        cfg["health_check"] = {"enable": True, "bind": f"127.0.0.1:{free_port()}"}
    n = NodeProc(tmp_path / f"node{i}", i, cfg, env=env)
    n.execute(SCHEMA)
    return n


def health(n: NodeProc) -> tuple[int, dict[str, Any]]:
    bind = n.config_path.read_text().split('bind = "')[1].split('"')[0]
    try:
        with urllib.request.urlopen(f"http://{bind}/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def rows(n: NodeProc) -> list[tuple[Any, ...]]:
    return n.query("SELECT * FROM items ORDER BY id")


def pending(n: NodeProc) -> int:
    return int(n.query("SELECT count(*) FROM __harmonylite__log WHERE id > "
                       "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0])


def publish_raw(url: str, payloads: list[bytes]) -> list[int]:
    async def go() -> list[int]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        seqs = [int((await js.publish(SUBJECT, p)).seq) for p in payloads]
        await nc.close()
        return seqs
    return asyncio.run(go())


def test_poison_batches_are_dead_lettered_and_every_node_keeps_applying(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a, b = (node(tmp_path, nats_server, i).start() for i in (1, 2))
    cols, keys = {"items": ["id", "owner", "name", "qty"]}, {"items": ["id"]}
    too_big = cbor2.dumps({"v": 1, "n": 7, "t": cols, "k": keys,
                           "c": [["items", 1, [50, 1, "big", 2**64]]]})
    no_keys = cbor2.dumps({"v": 1, "n": 7, "t": cols, "k": {},
                           "c": [["items", 1, [51, 1, "nokey", 1.0]]]})
    seqs = publish_raw(nats_server.url, [too_big, no_keys])
    a.execute("INSERT INTO items VALUES (1, 1, 'after', 1.0)")
    for n in (a, b):
        wait_until(lambda n=n: rows(n) == [(1, 1, "after", 1.0)] and n.query(
            "SELECT seq FROM __harmonylite__seq") == [(3,)], 20, "the row after poison")
        dead = n.query("SELECT seq, origin, error FROM __harmonylite__dead_letter ORDER BY seq")
        assert [d[0] for d in dead] == seqs
        assert "OverflowError" in dead[0][2]
    # and it keeps going after a restart too
    b.stop()
    b.start()
    a.execute("INSERT INTO items VALUES (2, 1, 'later', 2.0)")
    wait_until(lambda: len(rows(b)) == 2, 20, "a row after the restart")


def test_write_lock_held_past_the_busy_timeout_stalls_then_resumes(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = node(tmp_path, nats_server, 1).start()
    b = node(tmp_path, nats_server, 2, health=True).start()
    wait_until(lambda: health(b)[0] == 200, 20, "node 2 healthy")
    holder = sqlite3.connect(b.db, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    released = threading.Event()
    try:
        a.execute("INSERT INTO items VALUES (1, 1, 'while locked', 1.0)")
        # busy timeout (10 s) + stall grace (5 s): health names the stall
        wait_until(lambda: health(b)[0] == 503, 40, "health 503 while the lock is held")
        _, body = health(b)
        assert any("apply stalled on harmonylite-changes-c-1" in r for r in body["reasons"])
        assert body["replication"][STREAM]["stalled"]
    finally:
        holder.execute("ROLLBACK")
        holder.close()
        released.set()
    wait_until(lambda: rows(b) == [(1, 1, "while locked", 1.0)], 30, "the row after the lock")
    wait_until(lambda: health(b)[0] == 200, 20, "health back to 200")
    assert b.log_text().count("apply stalled on") == 1  # once per state change
    assert "apply resumed" in b.log_text()


def test_text_that_is_not_utf8_replicates_and_publishing_goes_on(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a, b = (node(tmp_path, nats_server, i).start() for i in (1, 2))
    a.execute("INSERT INTO items VALUES (1, 1, CAST(x'ff41' AS TEXT), 1.0)")
    a.execute("INSERT INTO items VALUES (2, 1, 'plain', 2.0)")
    query = "SELECT id, hex(name), typeof(name) FROM items ORDER BY id"
    wait_until(lambda: len(b.query("SELECT id FROM items")) == 2, 20, "both rows")
    assert b.query(query) == a.query(query) == [(1, "FF41", "text"), (2, "706C61696E", "text")]
    b.execute("UPDATE items SET qty = 5 WHERE name = CAST(x'ff41' AS TEXT)")
    wait_until(lambda: a.query("SELECT qty FROM items WHERE id = 1") == [(5.0,)], 20, "update")


def roll_over(a: NodeProc, count: int, start: int, size: int = 1) -> None:
    """Write ``count`` rows, one published message each."""
    for i in range(start, start + count):
        a.execute("INSERT INTO items VALUES (?, 1, randomblob(?), 1.0)", (i, size))
        wait_until(lambda: pending(a) == 0, 20, "publish")


def test_node_frozen_across_a_roll_over_reports_the_gap_and_keeps_reporting_it(
        tmp_path: Path, nats_server: NatsServer) -> None:
    small = {"replication_log": {"max_entries": 10}}
    a = node(tmp_path, nats_server, 1, **small).start()
    b = node(tmp_path, nats_server, 2, health=True, **small).start()
    roll_over(a, 3, 1)
    wait_until(lambda: len(rows(b)) == 3, 20, "first rows")
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    try:
        # more than socket buffers hold, so the stream really drops what the node never read
        roll_over(a, 60, 100, size=200_000)
    finally:
        b.proc.send_signal(signal.SIGCONT)
    a.execute("INSERT INTO items VALUES (999, 1, 'last', 1.0)")
    wait_until(lambda: "gap in stream harmonylite-changes-c-1" in b.log_text(), 20, "gap logged")
    wait_until(lambda: health(b)[0] == 503, 20, "health 503")
    assert any("dropped messages" in r for r in health(b)[1]["reasons"])
    # a restart still knows (the position moved past the gap)
    b.stop()
    b.start()
    wait_until(lambda: health(b)[0] == 503, 20, "still 503 after a restart")
    assert "never applied messages" in b.log_text()


def test_restart_behind_the_stream_without_snapshots_is_loud(
        tmp_path: Path, nats_server: NatsServer) -> None:
    small = {"replication_log": {"max_entries": 10}}
    a = node(tmp_path, nats_server, 1, **small).start()
    b = node(tmp_path, nats_server, 2, health=True, **small).start()
    roll_over(a, 2, 1)
    wait_until(lambda: len(rows(b)) == 2, 20, "first rows")
    b.stop()
    roll_over(a, 20, 100)
    b.start()
    wait_until(lambda: health(b)[0] == 503, 20, "health 503")
    assert "never applied messages" in b.log_text()


def test_batch_sent_again_after_the_duplicate_window_does_not_revert_a_newer_write(
        tmp_path: Path, nats_server: NatsServer) -> None:
    async def make_stream() -> None:
        nc = await nats.connect(nats_server.url)
        await nc.jetstream().add_stream(StreamConfig(
            name=STREAM, subjects=[SUBJECT], max_msgs=1024, discard=DiscardPolicy.OLD,
            storage=StorageType.FILE, num_replicas=1, duplicate_window=1.0))
        await nc.close()
    asyncio.run(make_stream())
    a = node(tmp_path, nats_server, 1, env={"HARMONYLITE_TEST_CRASH_AFTER_ACK": "1"}).start()
    b = node(tmp_path, nats_server, 2).start()
    a.execute("INSERT INTO items VALUES (1, 1, 'old', 1.0)")
    assert a.proc is not None
    assert a.proc.wait(20) == 86  # died after the ack, before marking the batch published
    a.proc = None
    wait_until(lambda: rows(b) == [(1, 1, "old", 1.0)], 20, "the first write on node 2")
    b.execute("UPDATE items SET name = 'newer' WHERE id = 1")
    wait_until(lambda: pending(b) == 0, 20, "node 2 published")
    time.sleep(1.5)  # let the duplicate window (1 s) pass: the re-send is not de-duplicated
    a.env = None
    a.start()
    wait_until(lambda: pending(a) == 0, 20, "node 1 re-sent its batch")
    a.execute("INSERT INTO items VALUES (2, 1, 'marker', 1.0)")
    for n in (a, b):
        wait_until(lambda n=n: len(rows(n)) == 2, 20, "marker row")
        assert rows(n)[0] == (1, 1, "newer", 1.0)


def test_publish_false_applies_incoming_changes_to_locally_written_rows(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = node(tmp_path, nats_server, 1).start()
    b = node(tmp_path, nats_server, 2, publish=False).start()
    b.execute("INSERT INTO items VALUES (1, 2, 'local', 1.0)")
    a.execute("INSERT INTO items VALUES (1, 1, 'from a', 2.0)")
    wait_until(lambda: rows(b) == [(1, 1, "from a", 2.0)], 20, "incoming change applied")
    for i in range(2, 50):
        b.execute("INSERT INTO items VALUES (?, 2, 'local', 1.0)", (i,))
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__log")[0][0] <= 1, 20,
               "change log pruned")
    assert rows(a) == [(1, 1, "from a", 2.0)]


def test_full_disk_stalls_applying_and_it_resumes_when_space_is_freed(
        tmp_path: Path, nats_server: NatsServer) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
            capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        a = node(tmp_path, nats_server, 1).start()
        b = node(tmp_path, nats_server, 2, health=True, db_path=str(disk / "data.db"))
        shutil.copyfile(b.db, disk / "data.db")
        b.db = disk / "data.db"
        b.start()
        filler = disk / "filler"
        with filler.open("wb") as f:  # take every free byte
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        for i in range(1, 11):
            a.execute("INSERT INTO items VALUES (?, 1, randomblob(100000), 1.0)", (i,))
        wait_until(lambda: health(b)[0] == 503, 40, "health 503 on a full disk")
        assert any("apply stalled" in r for r in health(b)[1]["reasons"])
        filler.unlink()
        wait_until(lambda: len(rows(b)) == 10, 40, "the rows once space is freed")
        assert b.query("SELECT id, hex(name) FROM items ORDER BY id") == \
            a.query("SELECT id, hex(name) FROM items ORDER BY id")
        wait_until(lambda: health(b)[0] == 200, 20, "health back to 200")
        assert b.log_text().count("apply stalled on") == 1
        b.stop()
    finally:
        stop_leftovers()
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_dead_letter_retry_applies_once_the_cause_is_fixed(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = node(tmp_path, nats_server, 1)
    b = NodeProc(tmp_path / "node2", 2, {"nats": {"urls": [nats_server.url]}})
    b.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, owner INTEGER, name TEXT NOT NULL, "
              "qty REAL)")  # stricter than node 1's
    a.start()
    b.start()
    a.execute("INSERT INTO items VALUES (1, 1, NULL, 1.0)")
    a.execute("INSERT INTO items VALUES (2, 1, 'named', 2.0)")
    wait_until(lambda: len(rows(b)) == 1 and b.query(
        "SELECT count(*) FROM __harmonylite__dead_letter")[0][0] == 1, 20, "one applied, one not")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "harmonylite", "-config",
                               str(b.config_path), "dead-letters", *args],
                              capture_output=True, text=True, timeout=60)
    listing = json.loads(cli("list", "--json").stdout)
    assert [(d["table"], d["key"], d["origin"]) for d in listing] == [("items", "[1]", 1)]
    assert "NOT NULL" in listing[0]["error"]
    assert cli("retry", str(listing[0]["id"])).returncode == 1  # still refused: kept
    (again,) = json.loads(cli("list", "--json").stdout)
    assert again["id"] != listing[0]["id"] and "NOT NULL" in again["error"]
    # the operator relaxes the column (a table rebuild, followed online), then retries
    subprocess.run([str(Path(sys.executable).parent / "sqlite-utils"), "transform", str(b.db),
                    "items", "--not-null-false", "name"], check=True)
    assert cli("retry", "--all").returncode == 0
    assert json.loads(cli("list", "--json").stdout) == []
    assert rows(b) == [(1, 1, None, 1.0), (2, 1, "named", 2.0)]
    assert cli("drop", "--all").returncode == 0


def test_dead_letters_a_relaxed_schema_accepts_are_applied_without_a_command(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = node(tmp_path, nats_server, 1)
    b = NodeProc(tmp_path / "node2", 2, {"nats": {"urls": [nats_server.url]}})
    b.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, owner INTEGER, name TEXT NOT NULL, "
              "qty REAL)")
    a.start()
    b.start()
    a.execute("INSERT INTO items VALUES (1, 1, NULL, 1.0)")  # an old-schema row
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__dead_letter")[0][0] == 1,
               20, "the refused row recorded")
    subprocess.run([str(Path(sys.executable).parent / "sqlite-utils"), "transform", str(b.db),
                    "items", "--not-null-false", "name"], check=True)
    wait_until(lambda: rows(b) == [(1, 1, None, 1.0)], 20, "applied after the schema change")
    assert b.query("SELECT count(*) FROM __harmonylite__dead_letter") == [(0,)]
