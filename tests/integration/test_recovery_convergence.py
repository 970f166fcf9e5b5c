"""Recovery and snapshots off the straight path (issue 13), with real nodes, a real nats-server
and a file store: capture across restores, parked changes, never going backwards, ordering by
stream position, no snapshot storms, secrets, the right place named in errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from snapshot_helpers import fill, tmpfs
from test_recovery import (
    STREAM,
    Cluster,
    cli,
    items,
    manifest,
    node_cfg,
    position,
    save_snapshot,
    stream_state,
    write,
)

from nodes import NodeProc, wait_until

pytest_plugins = ["test_recovery"]  # the ``cluster`` fixture


def _snap(cluster: Cluster) -> dict[str, Any]:
    snap: dict[str, Any] = node_cfg(cluster.server, cluster.store)["snapshot"]
    return snap


def _snapshots(store: Path) -> list[str]:
    return sorted(p.name[: -len(".json")] for p in (store / "snapshots").glob("*.json"))


def _triggers(node: NodeProc) -> int:
    rows = node.query("SELECT count(*) FROM sqlite_master WHERE type = 'trigger' "
                      "AND name LIKE '__harmonylite__%'")
    return int(rows[0][0])


def test_in_place_restore_carries_capture_before_the_node_starts(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 11))
    wait_until(lambda: len(items(b)) == 10, 20, "b to replicate")
    save_snapshot(a)
    b.stop()
    res = cli(b, "restore", "latest")
    assert res.returncode == 0, res.stderr
    assert _triggers(b) > 0, "the restored database has no capture triggers"
    write(b, range(100, 101))  # the application writes before the node starts
    b.start()
    wait_until(lambda: [r[0] for r in items(a)] == [*range(1, 11), 100], 30,
               "the row written after the restore to reach a")


def test_parked_changes_travel_with_the_snapshot(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    a.execute("CREATE TABLE extra(id INTEGER PRIMARY KEY, v TEXT)")
    a.stop()
    a.start()  # capture now follows the new table
    conn = a.connect()
    try:
        for i in range(1, 11):
            conn.execute("INSERT INTO extra VALUES (?, ?)", (i, f"x{i}"))
    finally:
        conn.close()
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__parked") == [(10,)], 30,
               "b to park the changes to a table it lacks")
    wait_until(lambda: position(b) == stream_state(cluster.server)[1], 20, "b to catch up")
    snap = save_snapshot(b)
    assert manifest(cluster.store, snap)["sequences"][STREAM] == position(b)
    c = cluster.node(3, schema=False).start()
    assert f"Snapshot restored {snap}" in c.log_text()
    c.execute("CREATE TABLE extra(id INTEGER PRIMARY KEY, v TEXT)")
    wait_until(lambda: c.query("SELECT count(*) FROM extra") == [(10,)], 30,
               "c to apply the parked changes once it has the table")


def test_fallback_never_installs_a_snapshot_behind_the_database(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    b = cluster.node(2).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 20, "b to replicate")
    older = save_snapshot(a)
    write(a, range(21, 41))
    wait_until(lambda: len(items(b)) == 40, 20, "b to replicate")
    newest = save_snapshot(a)
    data = next((cluster.store / "snapshots").glob(f"{newest}.db*"))
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    b.stop()
    (b.dir / "seq-map.cbor").unlink()
    mark = len(b.log_text())
    b.start_async()
    assert b.proc is not None
    code = b.proc.wait(60)
    b.proc = None
    text = b.log_text()[mark:]
    assert f"Snapshot restored {older}" not in text
    assert f"skipping snapshot {older}: it is behind this node's database" in text
    assert code == 1 and "no sound snapshot to restore from" in text
    assert len(items(b)) == 40  # nothing it had was lost


def test_newest_is_by_stream_position_not_by_a_fast_clock(cluster: Cluster) -> None:
    a = cluster.node(1, snapshot={**_snap(cluster), "keep": 1}).start()
    write(a, range(1, 11))
    wait_until(lambda: position(a) > 0, 20, "a to apply its own writes")
    stale = save_snapshot(a)
    path = cluster.store / "snapshots" / f"{stale}.json"
    data = json.loads(path.read_text())
    data["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%S.000000Z",
                                       time.gmtime(time.time() + 600))
    path.write_text(json.dumps(data))
    stale_head = stream_state(cluster.server)[1]
    write(a, range(11, 31))
    # Published (the stream moved past the stale snapshot's position) and applied back.
    wait_until(lambda: len(items(a)) == 30 and stream_state(cluster.server)[1] > stale_head
               and position(a) == stream_state(cluster.server)[1], 20,
               "a to publish and apply its own writes")
    fresh = save_snapshot(a)
    assert _snapshots(cluster.store) == [fresh], "retention kept the stale snapshot"
    c = cluster.node(3, schema=False).start()
    assert f"Snapshot restored {fresh}" in c.log_text()
    wait_until(lambda: len(items(c)) == 30, 20, "c to have every row")


def test_verify_refuses_a_manifest_that_names_another_id(cluster: Cluster) -> None:
    a = cluster.node(1).start()
    write(a, range(1, 6))
    real = save_snapshot(a)
    other = real[:-8] + ("0" * 8 if not real.endswith("0" * 8) else "1" * 8)
    src = cluster.store / "snapshots" / f"{real}.json"
    (cluster.store / "snapshots" / f"{other}.json").write_bytes(src.read_bytes())
    res = cli(a, "verify", other)
    assert res.returncode == 1, res.stdout
    assert f"{real} ok" not in res.stdout
    assert f"names snapshot {real}" in res.stderr


def test_a_node_that_applies_nothing_takes_no_snapshots(cluster: Cluster) -> None:
    snap = {**_snap(cluster), "interval": 1000, "leader_ttl": 3000}
    n = cluster.node(4, replicate=False, snapshot=snap).start()
    write(n, range(1, 4))
    time.sleep(4)  # the observation window itself: four intervals of the old storm
    n.stop()
    assert len(_snapshots(cluster.store)) <= 1, _snapshots(cluster.store)
    assert "Became snapshot leader" not in n.log_text()


def test_nats_passwords_never_printed(cluster: Cluster, tmp_path: Path) -> None:
    secret = "S3cretPassw0rd"
    url = f"nats://user:{secret}@127.0.0.1:{cluster.server.port}"
    cfg: dict[str, Any] = {"nats": {"urls": [url], "connect_retries": 0,
                                    "reconnect_wait_seconds": 1},
                           "snapshot": {"enabled": True, "store": "nats"}}
    n = NodeProc(tmp_path / "secret", 9, cfg)
    n.execute("CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)")
    cluster.server.stop()
    res = cli(n, "list")
    assert res.returncode == 1
    assert secret not in res.stderr + res.stdout
    n.start_async()  # it starts without NATS and keeps trying: the reason is logged once
    wait_until(lambda: "NATS unreachable at" in n.log_text(), 60, "the outage to be logged")
    assert n.stop() == 0
    assert secret not in n.log_text()


def test_a_full_temp_dir_is_named_not_the_store(cluster: Cluster, tmp_path: Path) -> None:
    a = cluster.node(1).start()
    a.execute("WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < 2000) "
              "INSERT INTO items SELECT i, hex(randomblob(300)) FROM s")
    wait_until(lambda: position(a) == stream_state(cluster.server)[1], 20, "a to apply")
    save_snapshot(a)
    with tmpfs(tmp_path / "small", "4m") as small:
        fill(small, 64 * 1024)
        cfg_path = a.dir / "full.toml"
        text = a.config_path.read_text().replace("[snapshot]", f'[snapshot]\ntemp_dir = "{small}"')
        cfg_path.write_text(text)
        res = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(cfg_path),
                              "snapshot", "verify"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "no space left on device" in res.stderr
    assert str(small) in res.stderr and "bytes free" in res.stderr
    assert "file store" not in res.stderr
