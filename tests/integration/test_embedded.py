"""The embedded NATS server: two nodes, each with its own server, clustered with -cluster-peers."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nodes import NodeProc, wait_until
from servers import free_port


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_two_embedded_nodes_cluster_through_peers(tmp_path: Path) -> None:
    ports = [free_port(), free_port()]
    nodes = []
    for i, (mine, peer) in enumerate([(ports[0], ports[1]), (ports[1], ports[0])], start=1):
        node = NodeProc(
            tmp_path / f"node{i}", i, {"nats": {"bind_address": "127.0.0.1:-1"}},
            extra_args=["--cluster-addr", f"127.0.0.1:{mine}",
                        "-cluster-peers", f"nats://127.0.0.1:{peer}"],
        )
        node.execute("CREATE TABLE kv(k TEXT PRIMARY KEY, v TEXT)")
        nodes.append(node)
    # Both must run before JetStream (quorum 2 of 2) can create the streams.
    for node in nodes:
        node.start_async()
    for node in nodes:
        node.wait_started(90)
    a, b = nodes
    a.execute("INSERT INTO kv VALUES ('from-a', '1')")
    b.execute("INSERT INTO kv VALUES ('from-b', '2')")
    for node in nodes:
        wait_until(lambda n=node: n.query("SELECT * FROM kv ORDER BY k")
                   == [("from-a", "1"), ("from-b", "2")], 30, "embedded cluster replication")
    # A node killed with SIGKILL takes its embedded server with it, and comes back on restart.
    a.kill()
    with pytest.raises(ConnectionRefusedError):
        wait_until(lambda: not _listening(ports[0]), 10, "the killed node's NATS server to exit")
        socket.create_connection(("127.0.0.1", ports[0]), timeout=2).close()
    b.execute("INSERT INTO kv VALUES ('while-a-down', '3')")
    a.start(90)
    wait_until(lambda: a.query("SELECT count(*) FROM kv") == [(3,)], 30, "a to catch up")
    for node in nodes:
        assert (node.dir / "data.db-nats" / "jetstream").is_dir()  # store beside the database
        assert node.stop() == 0
    # The embedded servers stopped with their nodes: nothing listens on the cluster ports.
    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_leaf_servers_connect_the_embedded_server_to_a_hub(tmp_path: Path) -> None:
    import asyncio

    from harmonylite.config import ClusterFlags, NatsConfig
    from harmonylite.node.embedded_nats import EmbeddedNats, render_config
    from servers import NatsServer

    leaf_port = free_port()
    hub = NatsServer(tmp_path / "hub", config=f"leafnodes {{ listen: 127.0.0.1:{leaf_port} }}\n")
    hub.start()
    try:
        flags = ClusterFlags(leaf_servers=[f"127.0.0.1:{leaf_port}"])
        conf = render_config(node_id=1, store_dir=tmp_path / "js", nats=NatsConfig(),
                             cluster=flags)
        assert f"nats://127.0.0.1:{leaf_port}" in conf

        async def run() -> None:
            server = EmbeddedNats(node_id=1, db_path=tmp_path / "data.db", nats=NatsConfig(),
                                  cluster=flags)
            await server.start()
            try:
                await asyncio.to_thread(
                    wait_until, lambda: "Leafnode connection created"
                    in hub.log_path.read_text(errors="replace"), 20, "the leaf connection")
            finally:
                await server.stop()

        asyncio.run(run())
    finally:
        hub.stop()


def test_commands_use_a_running_nodes_embedded_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    node = NodeProc(tmp_path / "n1", 1, {"snapshot": {"enabled": True, "leader_ttl": 3000}})
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    node.start()
    wait_until(lambda: "Snapshot saved" in node.log_text(), 30, "the leader's first snapshot")
    out = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(node.config_path),
                          "snapshot", "list", "--json"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "embedded NATS server started" not in out.stderr  # no second server on the store
    assert '"node_id": 1' in out.stdout
    # A second node on the same database refuses instead of sharing the JetStream store.
    twin = subprocess.run([sys.executable, "-m", "harmonylite", "-config",
                           str(node.config_path)], capture_output=True, text=True, timeout=60)
    assert twin.returncode == 1 and "already runs" in twin.stderr
    assert node.stop() == 0


def test_a_dead_embedded_server_is_restarted_on_the_same_port(tmp_path: Path) -> None:
    import os
    import signal

    from harmonylite.node.embedded_nats import EmbeddedNats

    node = NodeProc(tmp_path / "n1", 1, {})
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    node.start()
    url = EmbeddedNats.running_url(node.db)
    assert url is not None
    ports = next((node.dir / "data.db-nats" / "ports").glob("*.ports"))
    os.kill(int(ports.stem.rpartition("_")[2]), signal.SIGKILL)
    wait_until(lambda: "restarting it" in node.log_text(), 20, "the node to notice")
    wait_until(lambda: EmbeddedNats.running_url(node.db) == url, 30, "the server on its old port")
    node.execute("INSERT INTO t VALUES (1)")  # published and applied through the new server
    wait_until(lambda: node.query("SELECT seq FROM __harmonylite__seq") == [(1,)], 30,
               "the change to go round")
    assert node.stop() == 0


class _ServerCount:
    """Samples the nats-server processes whose command line names ``workdir``, in a thread, and
    keeps the most seen at once (two on one JetStream store would corrupt it)."""

    def __init__(self, workdir: Path) -> None:
        import threading

        self.mark = str(workdir).encode()
        self.most = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def count(self) -> int:
        n = 0
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue  # exited meanwhile
            if b"nats-server" in cmdline and self.mark in cmdline:
                n += 1
        return n

    def _run(self) -> None:
        while not self.done.wait(0.01):
            self.most = max(self.most, self.count())

    def stop(self) -> int:
        self.done.set()
        self.thread.join(10)
        return self.most


def test_commands_and_a_starting_node_share_one_server_per_store(tmp_path: Path) -> None:
    """Two `snapshot save` and a `snapshot list` at once on a stopped node with the embedded
    server and the NATS store, and the node started while they run: one server on the store at
    any moment, no command cut off, the node waits for them, and every snapshot is whole."""
    import subprocess
    import sys

    from harmonylite.node.embedded_nats import EmbeddedNats

    node = NodeProc(tmp_path / "n1", 1, {"snapshot": {"enabled": True, "leader_ttl": 3000}})
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, b BLOB)")
    # Enough data that a save is still uploading when the node starts.
    node.execute("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 24) "
                 "INSERT INTO t SELECT i, randomblob(1 << 20) FROM n")
    servers = _ServerCount(node.dir / "data.db-nats")

    def snapshot(*args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "harmonylite", "-config",
                                 str(node.config_path), "snapshot", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    commands = [snapshot("save"), snapshot("save"), snapshot("list", "--json")]
    try:
        wait_until(lambda: EmbeddedNats.running_url(node.db) is not None, 30,
                   "a command to start the embedded server")
        node.start_async()  # while the commands run on the server
        results = [p.communicate(timeout=60) for p in commands]
        codes = [p.returncode for p in commands]
        # Exit 75 stays the answer for a capture already running; nothing else fails.
        assert codes[0] in (0, 75) and codes[1] in (0, 75) and 0 in codes[:2], results
        assert codes[2] == 0, results[2][1]
        saved = [out.strip() for (out, _), code in zip(results[:2], codes[:2], strict=True)
                 if code == 0]
        node.wait_started(60)
        url = EmbeddedNats.running_url(node.db)
        # A command while the node runs uses the node's server, and leaves it running.
        for sid in saved:
            res = subprocess.run([sys.executable, "-m", "harmonylite", "-config",
                                  str(node.config_path), "snapshot", "verify", sid],
                                 capture_output=True, text=True, timeout=60)
            assert res.returncode == 0, res.stderr
            assert "embedded NATS server started" not in res.stderr
        assert EmbeddedNats.running_url(node.db) == url
        node.execute("INSERT INTO t VALUES (100, x'00')")
        wait_until(lambda: node.query("SELECT seq FROM __harmonylite__seq") == [(1,)], 30,
                   "the change to go round the node's server")
        assert "restarting it" not in node.log_text()
    finally:
        for proc in commands:
            if proc.poll() is None:
                proc.kill()
        most = servers.stop()
    assert most == 1, f"{most} nats-servers ran on one JetStream store at once"
    assert node.stop() == 0
