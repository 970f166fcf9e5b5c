"""Two clusters on one NATS account, kept apart by their prefixes: nothing is shared.

Each cluster has two node processes on the same nats-server; cluster A uses one pair of
``stream_prefix`` / ``subject_prefix``, cluster B another. Each must get its own snapshot leader
and snapshots, its own schema registry and its own rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)"
TTL_MS = 3000


def cluster_cfg(url: str, prefix: str) -> dict[str, Any]:
    return {
        "nats": {"urls": [url], "stream_prefix": f"{prefix}-changes",
                 "subject_prefix": f"{prefix}-change-log", "reconnect_wait_seconds": 1},
        "snapshot": {"enabled": True, "store": "nats", "interval": 2000,
                     "leader_ttl": TTL_MS},
    }


def health(node: NodeProc) -> tuple[int, dict[str, Any]]:
    port = node.health_port  # type: ignore[attr-defined]
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def leads(node: NodeProc) -> bool:
    return bool(health(node)[1].get("snapshot", {}).get("leader"))


@pytest.fixture
def two_clusters(tmp_path: Path, nats_server: NatsServer) -> Iterator[dict[str, list[NodeProc]]]:
    clusters: dict[str, list[NodeProc]] = {}
    node_id = 0
    for prefix in ("alpha", "beta"):
        clusters[prefix] = []
        for _ in range(2):
            node_id += 1
            port = free_port()
            node = NodeProc(tmp_path / f"{prefix}{node_id}", node_id, {
                **cluster_cfg(nats_server.url, prefix),
                # An idle cluster skips unchanged snapshots: give the newest one time to age.
                "health_check": {"enable": True, "bind": f"127.0.0.1:{port}",
                                 "max_snapshot_age_intervals": 30.0},
            })
            node.health_port = port  # type: ignore[attr-defined]
            node.execute(SCHEMA)
            clusters[prefix].append(node)
    for nodes in clusters.values():
        for node in nodes:
            node.start_async()
    for nodes in clusters.values():
        for node in nodes:
            node.wait_started(90)
    yield clusters
    for nodes in clusters.values():
        for node in nodes:
            node.stop()


def test_two_clusters_on_one_account_share_no_stream_bucket_or_key(
        two_clusters: dict[str, list[NodeProc]]) -> None:
    alpha, beta = two_clusters["alpha"], two_clusters["beta"]
    everyone = alpha + beta

    # Rows written in one cluster reach its other node and never the other cluster.
    alpha[0].execute("INSERT INTO items VALUES (1, 'alpha row')")
    beta[0].execute("INSERT INTO items VALUES (2, 'beta row')")
    wait_until(lambda: alpha[1].query("SELECT name FROM items") == [("alpha row",)], 30,
               "alpha's row on alpha's second node")
    wait_until(lambda: beta[1].query("SELECT name FROM items") == [("beta row",)], 30,
               "beta's row on beta's second node")

    # One snapshot leader per cluster, each cluster with its own snapshots.
    def one_leader_each() -> bool:
        return sum(map(leads, alpha)) == 1 and sum(map(leads, beta)) == 1

    wait_until(one_leader_each, 45, "one snapshot leader in each cluster")

    def snapshots(nodes: list[NodeProc]) -> list[dict[str, Any]]:
        out = nodes[0].cli("snapshot", "list", "--json")
        assert out.returncode == 0, out.stderr
        return list(json.loads(out.stdout))

    wait_until(lambda: bool(snapshots(alpha)) and bool(snapshots(beta)), 60,
               "a snapshot in each cluster")
    alpha_ids = {n.node_id for n in alpha}
    beta_ids = {n.node_id for n in beta}
    assert {m["node_id"] for m in snapshots(alpha)} <= alpha_ids
    assert {m["node_id"] for m in snapshots(beta)} <= beta_ids
    assert not set(snapshots(alpha)[0]["sequences"]) & set(snapshots(beta)[0]["sequences"])

    # Each cluster's schema registry holds its own nodes only.
    def registry(nodes: list[NodeProc]) -> set[str]:
        out = nodes[0].cli("schema", "status", "--cluster", "--json")
        assert out.returncode == 0, out.stderr
        return set(json.loads(out.stdout)["nodes"])

    wait_until(lambda: registry(alpha) == {f"node-{i}" for i in alpha_ids}
               and registry(beta) == {f"node-{i}" for i in beta_ids}, 30,
               "each cluster's schema registry to hold its own nodes")

    # Each cluster's view (cluster status, the live page) holds its own nodes only.
    def view(nodes: list[NodeProc]) -> set[int]:
        out = nodes[0].cli("cluster", "status", "--json")
        return {n["node_id"] for n in json.loads(out.stdout)["nodes"]}

    wait_until(lambda: view(alpha) == alpha_ids and view(beta) == beta_ids, 30,
               "each cluster's heartbeats to hold its own nodes")

    for node in everyone:
        wait_until(lambda n=node: health(n)[0] == 200, 30,  # type: ignore[misc]
                   f"node {node.node_id} healthy ({health(node)[1].get('reasons')})")
    wait_until(lambda: alpha[0].query("SELECT id FROM items") == [(1,)]
               and beta[0].query("SELECT id FROM items") == [(2,)], 5, "rows kept apart")
    for node in everyone:
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
