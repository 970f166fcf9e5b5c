"""Health and snapshots of an idle database: a snapshot holding every change is fresh however old
it is; a change no snapshot holds makes the node unhealthy once it is older than the limit."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import httpx

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)"
STREAM = "harmonylite-changes-c-1"
INTERVAL_MS = 2000
LIMIT = 3 * INTERVAL_MS / 1000  # health_check.max_snapshot_age_intervals (3) intervals
# Longer than the limit: the node that is not the leader must still learn of a new snapshot
# within the limit, not at the lease's pace.
LEADER_TTL_MS = 20_000


def health(port: int) -> tuple[int, dict[str, Any]]:
    r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    return r.status_code, r.json()


def gauge(port: int, name: str) -> float:
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not exposed")


def newest_holding_row_1(store: Path) -> str | None:
    """The newest committed snapshot whose position includes the first message."""
    ids = sorted(m.stem for m in (store / "snapshots").glob("*.json")
                 if json.loads(m.read_text())["sequences"].get(STREAM, 0) >= 1)
    return ids[-1] if ids else None


def test_idle_database_stays_healthy_and_an_unsaved_change_turns_it_unhealthy(
        tmp_path: Path, nats_server: NatsServer) -> None:
    store = tmp_path / "store"
    store.mkdir()
    nodes: list[NodeProc] = []
    ports: list[tuple[int, int]] = []
    for i in (1, 2):
        port, metrics = free_port(), free_port()
        nodes.append(NodeProc(tmp_path / f"n{i}", i, {
            "nats": {"urls": [nats_server.url], "reconnect_wait_seconds": 1},
            "replication_log": {"shards": 1},
            "snapshot": {"enabled": True, "store": "file", "file": {"path": str(store)},
                         "interval": INTERVAL_MS, "leader_ttl": LEADER_TTL_MS},
            "health_check": {"enable": True, "bind": f"127.0.0.1:{port}"},
            "prometheus": {"enable": True, "bind": f"127.0.0.1:{metrics}"},
        }))
        ports.append((port, metrics))
    for n in nodes:
        n.execute(SCHEMA)
        n.start()
    a = nodes[0]
    wait_until(lambda: all(health(p)[0] == 200 for p, _ in ports), 60, "both nodes healthy")
    answers: list[tuple[int, list[str]]] = []

    def both_know_row_1() -> bool:
        newest = newest_holding_row_1(store)
        known = 0
        for p, _ in ports:
            code, body = health(p)
            answers.append((code, body["reasons"]))
            assert code == 200, answers[-1]
            known += newest is not None and body["snapshot"]["last_id"] == newest
        return known == len(ports)

    # One write: the leader saves it, and every node learns of that snapshot well within the
    # limit (healthy throughout, the node that is not the leader too).
    a.execute("INSERT INTO items VALUES (1, 'x')")
    wait_until(both_know_row_1, 2 * LIMIT + 30, "both nodes to know a snapshot holding row 1")
    first = newest_holding_row_1(store)

    # Idle for well over the limit: no new snapshot (nothing changed), and healthy throughout.
    idle_from = time.monotonic()

    def idle_long_enough() -> bool:
        for p, _ in ports:
            code, body = health(p)
            answers.append((code, body["reasons"]))
            assert code == 200, answers[-1]
        return time.monotonic() - idle_from > 3 * LIMIT

    wait_until(idle_long_enough, 6 * LIMIT + 30, "an idle spell three limits long")
    for p, m in ports:
        body = health(p)[1]
        assert body["snapshot"]["last_id"] == first  # the same snapshot all along
        assert body["snapshot"]["age_seconds"] > LIMIT  # older than the limit, and fresh
        assert gauge(m, "harmonylite_snapshot_staleness_seconds") == 0
        assert gauge(m, "harmonylite_snapshot_age_seconds") > LIMIT

    # Snapshots become impossible (the store is gone), then one write.
    store.rename(tmp_path / "store-gone")
    store.write_text("not a directory")
    written = time.monotonic()
    a.execute("INSERT INTO items VALUES (2, 'y')")
    unhealthy_at: dict[int, float] = {}

    def all_unhealthy() -> bool:
        for p, _ in ports:
            code, body = health(p)
            if code == 503 and p not in unhealthy_at:
                assert any("lacks a change" in r for r in body["reasons"]), body["reasons"]
                unhealthy_at[p] = time.monotonic()
        return len(unhealthy_at) == len(ports)

    wait_until(all_unhealthy, LIMIT + 60, "503 once the unsaved change is older than the limit")
    for p, at in unhealthy_at.items():
        assert at - written >= LIMIT - 1.0, (p, at - written)  # not before the limit
    for _, m in ports:
        staleness = gauge(m, "harmonylite_snapshot_staleness_seconds")
        assert not math.isnan(staleness) and staleness >= LIMIT - 1.0
    for n in nodes:
        assert n.stop() == 0
