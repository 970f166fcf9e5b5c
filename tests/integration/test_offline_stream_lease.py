"""The snapshot lease when a stream is offline for the whole cluster.

With one replica per stream (HarmonyLite's example files), stopping the node whose embedded server
holds a stream takes that stream offline for every node: none can consume it, so none is behind
any other. If that node also held the snapshot lease and died, one of the others must take it
once the lease expires: an outage that freezes every node alike is no reason to leave the cluster
without a snapshot leader.
"""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import nats

from cluster import Cluster
from harmonylite.node.embedded_nats import EmbeddedNats
from nodes import NodeProc, health, wait_until
from servers import free_port

SCHEMA = "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)"
STREAM = "harmonylite-changes-c-1"


def _stream_host(node: NodeProc) -> int:
    """The node id whose embedded server holds the (one-replica) stream."""
    url = EmbeddedNats.running_url(node.db)
    assert url is not None

    async def ask() -> str:
        nc = await nats.connect(url)
        try:
            info = await nc.jetstream().stream_info(STREAM)
            assert info.cluster is not None and info.cluster.leader, info
            return info.cluster.leader
        finally:
            await nc.close()

    name = asyncio.run(ask())
    return int(name.rpartition("-")[2])  # embedded servers are named harmonylite-<node id>


def _leader(nodes: list[NodeProc]) -> int | None:
    found = [n.node_id for n in nodes if n.proc is not None
             and health(n)[1].get("snapshot", {}).get("leader")]
    return found[0] if len(found) == 1 else None


def _node(tmp_path: Path, i: int, nats_cfg: dict[str, object], snapshot: dict[str, object],
          args: list[str]) -> NodeProc:
    node = NodeProc(tmp_path / f"n{i}", i, {
        "nats": nats_cfg,
        "replication_log": {"shards": 1, "replicas": 1, "max_entries": 10_000},
        "snapshot": {"enabled": True, "interval": 0, "leader_ttl": 8000,
                     "store": "file", "file": {"path": str(tmp_path / "store")}, **snapshot},
        "health_check": {"enable": True, "bind": f"127.0.0.1:{free_port()}"},
    }, extra_args=args)
    node.execute(SCHEMA)
    return node


def _start(nodes: list[NodeProc]) -> list[NodeProc]:
    """Start the nodes together (the embedded servers form their cluster meanwhile), until one
    of them leads."""
    for node in nodes:
        node.start_async()
    for node in nodes:
        node.wait_started(120)
    wait_until(lambda: _leader(nodes) is not None, 60, "a snapshot leader")
    return nodes


def test_the_lease_moves_when_its_holder_takes_a_stream_offline(tmp_path: Path) -> None:
    ports = [free_port() for _ in range(3)]
    nodes = _start([_node(tmp_path, i, {"bind_address": "127.0.0.1:-1"}, {}, [
        "--cluster-addr", f"127.0.0.1:{mine}", "-cluster-peers",
        ",".join(f"nats://127.0.0.1:{p}" for p in ports if p != mine)])
        for i, mine in enumerate(ports, start=1)])
    host = _stream_host(nodes[0])
    holder = nodes[host - 1]
    others = _make_holder(nodes, holder)
    # The machine dies: the node and its server at once, the lease left to expire (by then the
    # others have seen the stream offline).
    server_pid = int(next((holder.dir / "data.db-nats" / "ports").glob("*.ports"))
                     .stem.rpartition("_")[2])
    holder.kill()
    os.kill(server_pid, signal.SIGKILL)
    _lease_moves(others)
    for n in others:
        assert n.stop() == 0


def _make_holder(nodes: list[NodeProc], holder: NodeProc) -> list[NodeProc]:
    """Make ``holder`` the lease holder: freeze the others until it takes the lease (their
    servers, embedded child processes or outside ones, keep serving meanwhile)."""
    others = [n for n in nodes if n is not holder]
    for n in others:
        assert n.proc is not None
        n.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(lambda: bool(health(holder)[1].get("snapshot", {}).get("leader")), 60,
                   f"node {holder.node_id}, which holds {STREAM}, to take the lease")
    finally:
        for n in others:
            assert n.proc is not None
            n.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: _leader(nodes) == holder.node_id, 30,
               f"node {holder.node_id} alone to hold the lease")
    return others


def _lease_moves(others: list[NodeProc]) -> None:
    try:
        wait_until(lambda: _leader(others) is not None, 60,
                   "another node to take the lease while the stream is offline")
    except AssertionError as exc:
        logs = "\n".join(f"--- node {n.node_id}\n{n.log_text()[-4000:]}" for n in others)
        raise AssertionError(f"{exc}\n{logs}") from None


def test_the_lease_moves_when_a_stream_whose_requests_time_out_is_offline(
        tmp_path: Path) -> None:
    # Three outside servers, a node on each. When the one server of a one-replica stream dies,
    # the others' requests for the stream time out (for minutes here) instead of answering
    # "offline": only the cluster's stream listing, naming it missing, tells the two apart.
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        nodes = _start([_node(tmp_path, i, {"urls": [url]}, {"nats": {"replicas": 3}}, [])
                        for i, url in enumerate(cluster.urls, start=1)])
        host = cluster.stream_leader(STREAM)
        holder = nodes[host]
        others = _make_holder(nodes, holder)
        holder.kill()
        cluster.kill(host)
        _lease_moves(others)
        for n in others:
            assert n.stop() == 0
    finally:
        cluster.stop()
