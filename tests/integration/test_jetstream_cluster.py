"""harmonylite on a three-server JetStream cluster, through server failures (issue 15).

One cluster and three nodes (R3 streams, KV and object store, two shards, snapshots every 3 s)
are shared by the scenarios, which run in order; each injects one fault while every node writes,
then checks that every node converges with nothing lost, without restarting any node, and that
the longest write→visible gap stayed within the election time plus a few seconds.

Node 1 lists server 0 first, nodes 2 and 3 server 1 (first URL first: ``randomize_urls`` is
off), so server 2 has no node connected and server 0 has exactly node 1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import ConsumerConfig, DeliverPolicy

from cluster import Cluster
from nodes import NodeProc, health, stop_leftovers, wait_until
from servers import free_port
from workload import SCHEMA, Workload

STREAMS = ["harmonylite-changes-c-1", "harmonylite-changes-c-2"]
SNAPSHOT_BUCKET = "harmonylite-changes-snapshot-store"
# Slack over the measured election on this shared 2-core machine (the goal is 2 s).
STALL_SLACK = 4.0


class Rig:
    def __init__(self, base: Path) -> None:
        self.cluster = Cluster(base / "cluster").start()
        urls = self.cluster.urls
        firsts = [0, 1, 1]
        self.nodes: list[NodeProc] = []
        for i, first in enumerate(firsts, start=1):
            order = [urls[first]] + [u for j, u in enumerate(urls) if j != first]
            node = NodeProc(base / f"node{i}", i, {
                "nats": {"urls": order},
                "cleanup_interval": 1000,
                "replication_log": {"shards": 2, "replicas": 3, "max_entries": 100_000},
                "snapshot": {"enabled": True, "interval": 3000, "leader_ttl": 3000, "keep": 3,
                             "nats": {"replicas": 3}},
                "health_check": {"enable": True, "bind": f"127.0.0.1:{free_port()}"},
            })
            node.execute(SCHEMA)
            self.nodes.append(node)
        for node in self.nodes:
            node.start_async()
        for node in self.nodes:
            node.wait_started(90)
        self.work = Workload(self.nodes).start()

    def close(self) -> None:
        self.work.stop()
        for node in self.nodes:
            if node.proc is not None:
                node.stop()
        self.cluster.stop()

    def move_leaders(self, server: int) -> None:
        """Make ``server`` the leader of both change streams (the placement of a fault)."""
        name = self.cluster.servers[server].name

        async def step_down(js: Any, stream: str) -> None:
            await js._nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}",
                                 json.dumps({"placement": {"preferred": name}}).encode(), 5)

        for stream in STREAMS:
            def led(stream: str = stream) -> bool:
                leader = self.cluster.stream_leader(stream)
                if leader == server:
                    return True
                if leader >= 0:  # (between leaders, a step-down request is refused)
                    self.cluster.ask(lambda js: step_down(js, stream))
                return False

            wait_until(led, 40, f"server {server} to lead {stream}")

    def election(self, killed: set[int], started: float, timeout: float = 60) -> float:
        """Seconds from ``started`` until the cluster serves the streams again: each has a
        leader outside ``killed`` and takes a new consumer (which needs the meta leader too)."""
        async def takes_consumer(js: Any, stream: str) -> None:
            info = await js.add_consumer(stream, ConsumerConfig(
                inactive_threshold=5.0, mem_storage=True, num_replicas=1,
                deliver_policy=DeliverPolicy.NEW))
            await js.delete_consumer(stream, info.name)

        def elected() -> bool:
            try:
                if any(self.cluster.stream_leader(s) in killed | {-1} for s in STREAMS):
                    return False
                for s in STREAMS:
                    self.cluster.ask(lambda js, s=s: takes_consumer(js, s))
                return True
            except Exception:
                return False

        wait_until(elected, timeout, "new stream leaders")
        return time.monotonic() - started

    def converge(self, what: str, timeout: float = 120) -> None:
        self.work.wait_visible(timeout, what)
        for node in self.nodes:
            assert node.proc is not None and node.proc.poll() is None, "a node stopped"
        wait_until(lambda: all(health(n)[0] == 200 for n in self.nodes), 30,
                   f"{what}: every node healthy again")


# Shared by the module's tests in order: SHARED_CLUSTER_MODULES in tests/conftest.py sends
# the whole module to one pytest-xdist worker.
@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    r = Rig(tmp_path_factory.mktemp("jscluster"))
    try:
        yield r
    finally:
        r.close()
        stop_leftovers()


@pytest.fixture(autouse=True)
def _stop_leftover_nodes() -> Iterator[None]:
    # (Overrides the suite's per-test cleanup: the nodes here live for the whole module.)
    yield


def test_every_bucket_follows_the_configured_replicas(rig: Rig) -> None:
    wait_until(lambda: any("Snapshot saved" in n.log_text() for n in rig.nodes), 60,
               "the first snapshot")
    for stream in [*STREAMS, "KV_e-harmonylite", "KV_harmonylite-schema-registry",
                   "KV_harmonylite-cluster-settings", "KV_harmonylite-changes-heartbeats",
                   "KV_harmonylite-changes-last-seen", f"OBJ_{SNAPSHOT_BUCKET}"]:
        # Each bucket is made by the part of the node that first needs it (the heartbeats' once
        # the node runs), not necessarily before the first snapshot on a busy machine.
        found: list[Any] = []

        def exists(stream: str = stream, found: list[Any] = found) -> bool:
            try:
                found.append(rig.cluster.stream_state(stream))
            except RuntimeError as exc:
                # Not there yet, or a cluster busy creating it did not answer within the
                # client's 2 s (seen on a loaded machine): ask again until the deadline.
                if "stream not found" not in str(exc) and "timeout" not in str(exc):
                    raise
                return False
            return True

        wait_until(exists, 60, f"{stream} to be created")
        info = found[-1]
        assert info.config.num_replicas == 3, f"{stream} has {info.config.num_replicas} replicas"


def test_killing_the_stream_leader_stalls_for_about_the_election(rig: Rig) -> None:
    rig.move_leaders(2)  # a server no node is connected to
    rig.converge("before the fault")
    rig.work.window()
    started = time.monotonic()
    rig.cluster.kill(2)
    election = rig.election({2}, started)
    rig.converge("after killing the stream leader")
    stall = rig.work.window()
    print(f"kill stream leader: election {election:.1f} s, longest write→visible {stall:.1f} s")
    assert stall <= election + STALL_SLACK, f"stalled {stall:.1f} s, election {election:.1f} s"
    rig.cluster.restart(2)
    rig.cluster.wait_ready()


def test_killing_the_server_a_node_uses_loses_no_consumer(rig: Rig) -> None:
    rig.move_leaders(0)  # node 1's server, which also leads both streams
    rig.converge("before the fault")
    rig.work.window()
    started = time.monotonic()
    written = rig.work.counts()
    rig.cluster.kill(0)

    # Nothing silent: until the cluster serves the streams again, node 1 says which stream it
    # cannot consume; or it consumes again first (a fast election, the consumer moved to a live
    # server), shown by a row node 2 wrote after the kill. The stall check below bounds how long
    # either may take.
    def reported_or_consuming() -> bool:
        code, body = health(rig.nodes[0])
        if code == 503 and any("is not being consumed" in r for r in body.get("reasons", [])):
            return True
        top = rig.nodes[0].query("SELECT max(n) FROM w WHERE node = 2")[0][0]
        return top is not None and top >= written[2]

    wait_until(reported_or_consuming, 30,
               "node 1's health to name a stream not being consumed, or node 1 to consume again")
    election = rig.election({0}, started)
    rig.converge("after killing node 1's server")
    stall = rig.work.window()
    print(f"kill node's server: election {election:.1f} s, longest write→visible {stall:.1f} s")
    assert stall <= election + STALL_SLACK, f"stalled {stall:.1f} s, election {election:.1f} s"
    assert "cannot resubscribe" not in rig.nodes[0].log_text()
    rig.cluster.restart(0)
    rig.cluster.wait_ready()


def test_a_rolling_restart_of_the_servers(rig: Rig) -> None:
    rig.converge("before the rolling restart")
    rig.work.window()
    for i in range(3):
        rig.cluster.servers[i].stop()
        rig.cluster.restart(i)
        rig.cluster.wait_ready()
        rig.work.wait_visible(60, f"after restarting server {i}")
    rig.converge("after the rolling restart")
    stall = rig.work.window()
    print(f"rolling restart: longest write→visible {stall:.1f} s")
    assert stall <= 15, f"stalled {stall:.1f} s"


def test_quorum_loss_reports_the_streams_then_converges(rig: Rig) -> None:
    rig.converge("before losing quorum")
    log_at = [len(n.log_text()) for n in rig.nodes]
    rig.cluster.kill(1)
    rig.cluster.kill(2)
    # Nothing silent meanwhile: every node's health is 503 and says why.
    wait_until(lambda: all(health(n)[0] == 503 for n in rig.nodes), 30,
               "every node's health to turn 503 without quorum")
    for n in rig.nodes:
        reasons = health(n)[1].get("reasons", [])
        assert reasons, reasons
    # (A capture whose fence passed just before the kill may still commit: counted from here.)
    saved_before = sum(n.log_text().count("Snapshot saved") for n in rig.nodes)
    written = rig.work.counts()
    # Local writes go on (published once quorum is back).
    wait_until(lambda: all(c > written[w] + 100 for w, c in rig.work.counts().items()), 30,
               "local writes to go on")
    saved_during = sum(n.log_text().count("Snapshot saved") for n in rig.nodes)
    assert saved_during == saved_before, "a snapshot was committed without quorum"
    rig.cluster.restart(1)
    rig.cluster.restart(2)
    rig.cluster.wait_ready()
    rig.converge("after quorum came back")  # (converge waits for health 200 too)
    for n, at in zip(rig.nodes, log_at, strict=True):  # said once per outage, not per retry
        assert n.log_text()[at:].count("cannot list snapshots") <= 2


def test_a_node_that_stops_applying_gives_the_snapshot_lease_up(rig: Rig) -> None:
    rig.converge("before stalling the leader")
    wait_until(lambda: any(health(n)[1]["snapshot"]["leader"] for n in rig.nodes), 30,
               "a snapshot leader")
    leader = next(n for n in rig.nodes if health(n)[1]["snapshot"]["leader"])
    holder = leader.connect()
    holder.execute("BEGIN IMMEDIATE")  # its apply stalls; the others go on writing
    try:
        wait_until(lambda: "Lost snapshot leadership" in leader.log_text().split(
            "Became snapshot leader")[-1], 40, "the stalled leader to step down")
        wait_until(lambda: any(health(n)[1]["snapshot"]["leader"] for n in rig.nodes
                               if n is not leader), 30, "a fresh node to take the lease")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    rig.converge("after the stall")
    def fresh_saver() -> NodeProc | None:  # whichever fresh node took the lease
        return next((n for n in rig.nodes if n is not leader
                     and "Snapshot saved" in n.log_text()), None)

    wait_until(lambda: fresh_saver() is not None, 30, "a snapshot by a fresh node")
    other = fresh_saver()
    assert other is not None
    out = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(other.config_path),
                          "snapshot", "verify", "latest"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "behind stream heads:" in out.stderr and "unknown" not in out.stderr, out.stderr
    listed = subprocess.run([sys.executable, "-m", "harmonylite", "-config",
                             str(other.config_path), "snapshot", "list", "--json"],
                            capture_output=True, text=True, timeout=60)
    for manifest in json.loads(listed.stdout):
        behind = {s: h - manifest["sequences"].get(s, 0) for s, h in manifest["heads"].items()}
        assert max(behind.values()) <= 500, behind


def test_embedded_servers_survive_one_nodes_server_dying(tmp_path: Path) -> None:
    import os
    import signal

    from harmonylite.node.embedded_nats import EmbeddedNats

    ports = [free_port() for _ in range(3)]
    nodes = []
    for i, mine in enumerate(ports, start=1):
        peers = ",".join(f"nats://127.0.0.1:{p}" for p in ports if p != mine)
        node = NodeProc(tmp_path / f"e{i}", i, {
            "nats": {"bind_address": "127.0.0.1:-1"},
            "replication_log": {"replicas": 3, "max_entries": 100_000},
        }, extra_args=["--cluster-addr", f"127.0.0.1:{mine}", "-cluster-peers", peers])
        node.execute(SCHEMA)
        nodes.append(node)
    for node in nodes:
        node.start_async()
    for node in nodes:
        node.wait_started(120)
    work = Workload(nodes).start()
    try:
        work.wait_visible(60, "before the fault")
        url = EmbeddedNats.running_url(nodes[0].db)
        pid_file = next((nodes[0].dir / "data.db-nats" / "ports").glob("*.ports"))
        os.kill(int(pid_file.stem.rpartition("_")[2]), signal.SIGKILL)
        wait_until(lambda: "restarting it" in nodes[0].log_text(), 30, "node 1 to notice")
        wait_until(lambda: EmbeddedNats.running_url(nodes[0].db) == url, 60,
                   "node 1's server back on its port")
        work.wait_visible(90, "after node 1's server died")
    finally:
        work.stop()
    work.wait_visible(60, "at the end")
    for node in nodes:
        assert node.proc is not None and node.proc.poll() is None
        assert node.stop() == 0
