"""`harmonylite cluster status` over three real nodes: JSON, exit codes, a killed node down within
15 s with the time since it was last seen, a stopped node's config, `cluster forget`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from nodes import stop_leftovers, wait_until
from trio import Trio


@pytest.fixture(scope="module")
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trio]:
    t = Trio(tmp_path_factory.mktemp("cluster-status"))
    try:
        yield t
    finally:
        t.close()
        stop_leftovers()


@pytest.fixture(autouse=True)
def _stop_leftover_nodes() -> Iterator[None]:
    # (Overrides the suite's per-test cleanup: the nodes here live for the whole module.)
    yield


def test_every_node_healthy_exit_0(trio: Trio) -> None:
    # Exit 0, and each node's tables reported (once it has read its schema, just after start).
    seen: list[dict[str, Any]] = []

    def ready() -> bool:
        code, doc = trio.status()
        seen[:] = [doc]
        return code == 0 and len(doc["nodes"]) == 3 and all(n["schema"] for n in doc["nodes"])

    wait_until(ready, 60, "every node healthy with its schema in its heartbeat")
    doc = seen[0]
    assert [n["node_id"] for n in doc["nodes"]] == [1, 2, 3]
    one = doc["nodes"][0]
    for key in ("host", "version", "publish", "replicate", "streams", "lag_messages",
                "snapshot", "schema", "dead_letters", "conflicts", "parked_changes", "db_bytes",
                "wal_bytes", "uptime_seconds", "last_seen_seconds"):
        assert key in one, key
    assert one["schema"].keys() == {"t"} and one["db_bytes"] > 0
    table = trio.cli(2, "cluster", "status")
    assert table.returncode == 0, table.stderr
    assert "3 of 3 nodes healthy" in table.stdout
    # The command's own disconnect at exit is no outage to warn about.
    assert "disconnected from NATS" not in table.stderr, table.stderr


def test_a_killed_node_is_down_within_15_s_and_exit_1(trio: Trio) -> None:
    trio.nodes[3].kill()
    killed = time.monotonic()
    wait_until(lambda: trio.states(trio.status()[1]).get(3) == "down", 15, "node 3 down")
    assert time.monotonic() - killed < 15
    # Writes elsewhere: the down node falls further behind, as the view shows.
    for i in range(20):
        trio.nodes[1].execute("INSERT INTO t VALUES (?, 'x')", (i,))
    doc = trio.wait_states({1: "healthy", 2: "healthy", 3: "down"}, code=1)
    # (The publisher may put several changes in one message.)
    wait_until(lambda: trio.status()[1]["nodes"][0]["lag_messages"] > 0, 20,
               "node 3's lag to count the writes it missed")
    down = doc["nodes"][0]  # worst first
    assert down["node_id"] == 3 and down["state"] == "down"
    assert down["last_seen_seconds"] >= 0 and "no heartbeat for" in down["reasons"][0]
    # The killed node's own config works too (its NATS is elsewhere; it need not run).
    assert trio.status(via=3)[0] == 1
    table = trio.cli(1, "cluster", "status")
    assert table.returncode == 1 and "down" in table.stdout and "seen" in table.stdout


def test_back_again_then_stopped_and_forgotten(trio: Trio) -> None:
    trio.nodes[3].start()
    trio.wait_all_healthy()
    trio.nodes[3].stop()  # a clean stop says so at once
    code, doc = trio.status()
    assert code == 1 and doc["nodes"][0]["node_id"] == 3
    assert doc["nodes"][0]["state"] == "down" and "stopped" in doc["nodes"][0]["reasons"][0]
    refused = trio.cli(1, "cluster", "forget", "2")
    assert refused.returncode == 1 and "still putting heartbeats" in refused.stderr
    forgot = trio.cli(1, "cluster", "forget", "3")
    assert forgot.returncode == 0, forgot.stderr
    trio.wait_states({1: "healthy", 2: "healthy"}, code=0)
