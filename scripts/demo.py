"""A narrated tour of harmonylite on the embedded NATS server, all on this machine.

Three nodes cluster their embedded NATS servers, write on every node and converge; the elected
snapshot leader saves a verified snapshot; a fourth node with no database is provisioned from it;
a corrupted snapshot is refused. Ends with a summary table. Everything lives in ./demo-data
(removed first), and every process is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCHEMA = ("CREATE TABLE IF NOT EXISTS notes(id INTEGER PRIMARY KEY, author TEXT, body TEXT, "
          "at REAL)")


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m" if sys.stdout.isatty() else f"\n== {text}", flush=True)


def info(text: str) -> None:
    print(f"   {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if pred():
            return time.monotonic() - start
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


class DemoNode:
    def __init__(self, root: Path, node_id: int, store: Path, cluster_port: int,
                 peers: list[int]) -> None:
        self.node_id = node_id
        self.dir = root / f"node{node_id}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.db = self.dir / "data.db"
        self.config = self.dir / "config.toml"
        self.config.write_text(
            f'db_path = "{self.db}"\nnode_id = {node_id}\n\n'
            '[nats]\nbind_address = "127.0.0.1:-1"\n\n'
            '[snapshot]\nstore = "file"\ninterval = 4000\nleader_ttl = 3000\n\n'
            f'[snapshot.file]\npath = "{store}"\n'
        )
        self.args = ["-cluster-addr", f"127.0.0.1:{cluster_port}",
                     "-cluster-peers", ",".join(f"nats://127.0.0.1:{p}" for p in peers)]
        self.log = self.dir / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "harmonylite", "-config", str(self.config), *self.args],
                stdout=fh, stderr=subprocess.STDOUT)

    def log_has(self, text: str) -> bool:
        return self.log.exists() and text in self.log.read_text(errors="replace")

    def wait_started(self, timeout: float = 90) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited:\n{self.log.read_text()[-2000:]}")
            return self.log_has("node started")

        wait_for(ready, timeout, f"node {self.node_id} to start")

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=10)
        try:
            return conn.execute(query, params).fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None


def read_seq_map(node_dir: Path) -> dict[str, int]:
    import cbor2

    path = node_dir / "seq-map.cbor"
    return dict(cbor2.loads(path.read_bytes())) if path.exists() else {}


def harmonylite(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dir", default="demo-data", help="working directory (removed first)")
    ap.add_argument("--cluster-ports", default="",
                    help="four comma-separated ports for the NATS cluster routes of nodes 1-4 "
                         "(default: free ports picked at start)")
    args = ap.parse_args()
    root = Path(args.dir).resolve()
    shutil.rmtree(root, ignore_errors=True)
    store = root / "snapshots"
    summary: list[tuple[str, str, str]] = []
    ports = ([int(p) for p in args.cluster_ports.split(",")] if args.cluster_ports
             else [free_port() for _ in range(4)])
    if len(ports) != 4:
        ap.error(f"--cluster-ports needs four ports, got {len(ports)}")
    nodes: list[DemoNode] = []

    def peers_of(i: int) -> list[int]:
        return [p for j, p in enumerate(ports) if j != i]

    try:
        say("1. Three nodes, each with its own embedded NATS server, clustered with -cluster-peers")
        for i in range(3):
            node = DemoNode(root, i + 1, store, ports[i], peers_of(i)[:2] if i < 3 else [])
            node.sql(SCHEMA)
            nodes.append(node)
        t0 = time.monotonic()
        for node in nodes:
            node.start()
        for node in nodes:
            node.wait_started()
            info(f"node {node.node_id}: {node.db} (NATS cluster port {ports[node.node_id - 1]})")
        summary.append(("cluster of 3 started", f"{time.monotonic() - t0:.1f} s", "ok"))

        say("2. Writes on every node converge everywhere")
        t0 = time.monotonic()
        for node in nodes:
            for k in range(100):
                node.sql("INSERT INTO notes(id, author, body, at) VALUES (?, ?, ?, ?)",
                         (node.node_id * 1000 + k, f"node{node.node_id}", f"note {k}", time.time()))
            info(f"node {node.node_id}: wrote 100 rows")
        nodes[0].sql("UPDATE notes SET body = 'edited on node 1' WHERE id = 2000")
        nodes[2].sql("DELETE FROM notes WHERE id = 1001")

        def converged() -> bool:
            states = [n.sql("SELECT * FROM notes ORDER BY id") for n in nodes]
            return len(states[0]) == 299 and all(s == states[0] for s in states)

        took = wait_for(converged, 60, "convergence")
        for node in nodes:
            count = node.sql("SELECT count(*) FROM notes")[0][0]
            info(f"node {node.node_id}: {count} rows, row 2000 = "
                 f"{node.sql('SELECT body FROM notes WHERE id = 2000')[0][0]!r}")
        summary.append(("300 inserts, 1 update, 1 delete converged", f"{took:.2f} s", "ok"))

        say("3. The elected snapshot leader saves a verified snapshot")
        leader: DemoNode | None = None

        def has_leader() -> bool:
            nonlocal leader
            leader = next((n for n in nodes if n.log_has("Became snapshot leader")), None)
            return leader is not None

        wait_for(has_leader, 30, "a snapshot leader")
        assert leader is not None
        info(f"node {leader.node_id} holds the lease 'snapshot-leader' (the others follow)")
        t0 = time.monotonic()

        def snapshots() -> list[dict[str, Any]]:
            out = harmonylite(nodes[0].config, "snapshot", "list", "--json")
            return list(json.loads(out.stdout)) if out.returncode == 0 and out.stdout else []

        def covering() -> dict[str, Any] | None:
            # The leader snapshots every 4 s here; wait for one that holds every write.
            for snap in snapshots():
                if sum(snap["sequences"].values()) >= converged_seq:
                    return snap
            return None

        converged_seq = sum(int(v) for v in
                            json.loads(json.dumps(read_seq_map(nodes[0].dir))).values())
        wait_for(lambda: covering() is not None, 60, "a snapshot holding every write")
        newest = covering()
        assert newest is not None
        info(f"snapshot {newest['id']} by node {newest['node_id']}: {newest['db_bytes']} bytes "
             f"of database stored as {newest['stored_bytes']} bytes ({newest['compression']}), "
             f"stream positions {newest['sequences']}")
        verify = harmonylite(nodes[0].config, "snapshot", "verify", newest["id"])
        info(f"snapshot verify -> exit {verify.returncode} (size, sha256, integrity_check)")
        summary.append((f"snapshot by leader node {newest['node_id']}, verified",
                        f"{time.monotonic() - t0:.1f} s", newest["id"]))

        say("4. A fourth node with no database is provisioned from the snapshot")
        node4 = DemoNode(root, 4, store, ports[3], ports[:3])
        t0 = time.monotonic()
        node4.start()
        try:
            node4.wait_started(90)
            nodes.append(node4)
            wait_for(lambda: node4.db.exists() and node4.sql("SELECT count(*) FROM notes")
                     == [(299,)], 60, "node 4 to converge")
            restored = node4.log_has("Snapshot restored")
            info(f"node 4: {node4.sql('SELECT count(*) FROM notes')[0][0]} rows "
                 f"({'restored from the snapshot, then replayed' if restored else 'replayed'})")
            summary.append(("new node provisioned", f"{time.monotonic() - t0:.1f} s",
                            "from snapshot" if restored else "by replay"))
        except (RuntimeError, TimeoutError) as exc:
            info(f"node 4 could not be provisioned: {str(exc).splitlines()[0]}")
            summary.append(("new node provisioned", "-", "not available"))
            node4.stop()

        say("5. A corrupted snapshot is refused")
        data = next(p for p in store.rglob("*.db*") if newest["id"] in p.name)
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        data.write_bytes(bytes(raw))
        info(f"flipped one byte in {data.relative_to(root)}")
        verify = harmonylite(nodes[0].config, "snapshot", "verify", newest["id"])
        info(f"snapshot verify -> exit {verify.returncode}: "
             f"{(verify.stdout + verify.stderr).strip().splitlines()[-1]}")
        summary.append(("corrupted snapshot refused", f"exit {verify.returncode}",
                        "ok" if verify.returncode == 1 else "NOT REFUSED"))
    finally:
        say("Stopping every node")
        for node in nodes:
            node.stop()
    say("Summary")
    width = max(len(s[0]) for s in summary)
    for step, took, result in summary:
        print(f"   {step:<{width}}  {took:>10}  {result}")
    print(f"\n   logs and databases: {root}")
    return 0 if all(r[2] not in ("NOT REFUSED",) for r in summary) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
