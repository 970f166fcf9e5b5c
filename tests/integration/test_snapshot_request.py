"""A node behind the streams gets the snapshot it needs: it asks the leader when no sound snapshot
covers it, reads the streams ahead meanwhile so the answer still covers it under heavy writes,
reports 503 while it waits, and says at once when no node can lead. Real nodes, a real
nats-server and a file store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_recovery import (
    STREAM,
    Cluster,
    items,
    log_after,
    manifest,
    node_cfg,
    position,
    stream_state,
    write,
)
from test_recovery_under_writes import Writer

from nodes import NodeProc, health, wait_until
from servers import free_port

pytest_plugins = ["test_recovery"]  # the ``cluster`` fixture


def _ids(node: NodeProc) -> set[int]:
    return {int(r[0]) for r in items(node)}


def _snapshots(store: Path) -> list[str]:
    return sorted(p.name[:-5] for p in (store / "snapshots").glob("*.json"))


def _corrupt_all(store: Path) -> list[str]:
    ids = _snapshots(store)
    for sid in ids:
        data = next((store / "snapshots").glob(f"{sid}.db*"))
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    return ids


def test_a_node_restarted_under_heavy_writes_restores_once_and_converges(
        cluster: Cluster) -> None:
    """`shards = 1`, ~250 writes/s, `max_entries = 60` (a stream holds a quarter of a second of
    these writes): b, restarted after the stream moved past it, restores one snapshot and runs
    on from it, without starting over, whatever the machine's load: the streams are read ahead
    while the snapshot comes, is downloaded and installed."""
    log = {"shards": 1, "max_entries": 60}
    snap = {**node_cfg(cluster.server, cluster.store)["snapshot"], "interval": 3_600_000,
            "leader_ttl": 3000}
    a = cluster.node(1, replication_log=log, snapshot=snap).start()
    wait_until(lambda: "Became snapshot leader" in a.log_text(), 30, "a to lead the snapshots")
    b = cluster.node(2, replication_log=log, snapshot=snap).start()
    app = Writer(a, 1_000_000, 250)
    try:
        wait_until(lambda: len(app.committed) >= 100, 30, "writes to flow")
        b.stop()
        pos = position(b)
        wait_until(lambda: stream_state(cluster.server)[0] > pos + 1, 30,
                   "the stream to drop what b has not applied")
        mark = len(b.log_text())
        b.start(90)
        text = log_after(b, mark)
        assert text.count("Snapshot restored") == 1, text[-4000:]
        assert "restoring a newer one" not in text and "starting over" not in text, text[-4000:]
        written = len(app.committed)
        wait_until(lambda: len(app.committed) >= written + 125, 30, "writes after b's start")
    finally:
        ours = app.stop()
    wait_until(lambda: _ids(a) == set(ours) and items(b) == items(a), 60,
               "b to converge with a")
    text = log_after(b, mark)
    assert "lost to this node" not in text and "never applied messages" not in text


def test_only_unsound_snapshots_cover_a_node_behind_so_it_asks_the_leader(
        cluster: Cluster) -> None:
    """Every snapshot that would cover b fails its SHA-256: b asks the leader for a fresh one
    (rather than exiting), reports 503 meanwhile, and restores what the leader takes."""
    snap = {**node_cfg(cluster.server, cluster.store)["snapshot"], "leader_ttl": 3000}
    a = cluster.node(1, snapshot=snap).start()
    hport = free_port()
    b = cluster.node(2, snapshot=snap,
                     health_check={"enable": True, "bind": f"127.0.0.1:{hport}"}).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 30, "b to replicate")
    b.stop()
    next_id = cluster.push_past(a, position(b), 21)
    # a's own message trigger (every 25 messages here) snapshots meanwhile: wait until it has
    # nothing left to take, then make every snapshot in the store unsound.

    def settled() -> bool:
        ids = _snapshots(cluster.store)
        last = stream_state(cluster.server)[1]
        return bool(ids) and last - max(
            manifest(cluster.store, s)["sequences"].get(STREAM, 0) for s in ids) < 25

    wait_until(settled, 30, "a's snapshots to catch up with the stream")
    unsound = _corrupt_all(cluster.store)
    mark = len(b.log_text())
    b.start_async()
    seen_503: list[dict[str, Any]] = []

    def started_or_waiting() -> bool:
        code, body = health(b)
        if code == 503 and any("waiting for a snapshot" in p for p in body.get("reasons", [])
                               + body.get("problems", [])):
            seen_503.append(body)
        return "node started" in log_after(b, mark) or b._dead()

    wait_until(started_or_waiting, 90, "b to get a fresh snapshot and start")
    text = log_after(b, mark)
    assert "no sound snapshot to restore from" in text and "asking the snapshot leader" in text, \
        text[-4000:]
    restored = [s for s in _snapshots(cluster.store) if f"Snapshot restored {s}" in text]
    assert restored and restored[0] not in unsound, text[-4000:]
    assert manifest(cluster.store, restored[0])["sequences"]
    assert seen_503, "b never reported 503 with the reason while it waited"
    wait_until(lambda: _ids(b) == set(range(1, next_id)) and items(b) == items(a), 30,
               "b to converge")


def test_no_node_can_lead_the_waiting_node_says_so_and_starts(cluster: Cluster) -> None:
    """The only other node has snapshots off: nobody can answer a request. b says so at once
    and starts (health 503, the gap named) instead of waiting the full request timeout."""
    snap = {**node_cfg(cluster.server, cluster.store)["snapshot"], "leader_ttl": 3000,
            "request_timeout": 600_000}
    a = cluster.node(1, snapshot={"enabled": False}).start()
    b = cluster.node(2, snapshot=snap).start()
    write(a, range(1, 21))
    wait_until(lambda: len(items(b)) == 20, 30, "b to replicate")
    b.stop()
    cluster.push_past(a, position(b), 21)
    mark = len(b.log_text())
    b.start(60)  # well under the request timeout
    text = log_after(b, mark)
    assert "no node holds the snapshot lease" in text, text[-4000:]
    assert "lost to this node" in text


def test_a_fresh_start_says_nothing_untrue_about_the_streams(cluster: Cluster) -> None:
    """A node on an empty, healthy stream takes the lease at once, without claiming that the
    head of a stream cannot be read."""
    snap = {**node_cfg(cluster.server, cluster.store)["snapshot"], "leader_ttl": 3000}
    a = cluster.node(1, snapshot=snap).start()
    wait_until(lambda: "Became snapshot leader" in a.log_text(), 30, "a to lead")
    assert "cannot be read" not in a.log_text()
    assert "not taking the snapshot lease" not in a.log_text()
