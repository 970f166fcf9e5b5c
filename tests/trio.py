"""Three real nodes on one nats-server, each with its health server (the live page) on a free
port: the cluster view's tests share one per module."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"


class Trio:
    def __init__(self, base: Path, *, snapshots: bool = False) -> None:
        """``snapshots``: on, in a file store the three share (so one node leads)."""
        self.nats = NatsServer(base / "nats-store").start()
        self.ports = {i: free_port() for i in (1, 2, 3)}
        snapshot = {"enabled": True, "store": "file", "file": {"path": str(base / "store")},
                    "leader_ttl": 3000} if snapshots else {"enabled": False}
        self.nodes = {i: NodeProc(base / f"n{i}", i, {
            "nats": {"urls": [self.nats.url], "reconnect_wait_seconds": 0},
            "health_check": {"enable": True, "bind": f"127.0.0.1:{self.ports[i]}"},
            "snapshot": snapshot,
        }) for i in (1, 2, 3)}
        for node in self.nodes.values():
            node.execute(SCHEMA)
            node.start_async()
        for node in self.nodes.values():
            node.wait_started()

    def url(self, i: int) -> str:
        return f"http://127.0.0.1:{self.ports[i]}"

    def status(self, *args: str, via: int = 1) -> tuple[int, dict[str, Any]]:
        """``cluster status --json`` through node ``via``'s config: exit code and document."""
        out = self.nodes[via].cli("cluster", "status", "--json", *args, timeout=60)
        try:
            doc = json.loads(out.stdout)
        except ValueError:
            raise AssertionError(f"not JSON: {out.stdout!r} {out.stderr!r}") from None
        return out.returncode, doc

    def states(self, doc: dict[str, Any]) -> dict[int, str]:
        return {n["node_id"]: n["state"] for n in doc["nodes"]}

    def wait_states(self, want: dict[int, str], timeout: float = 60,
                    code: int | None = None) -> dict[str, Any]:
        """Until ``cluster status --json`` shows these states (and exit code): its document."""
        seen: list[tuple[int, dict[str, Any]]] = []

        def reached() -> bool:
            seen[:] = [self.status()]
            return self.states(seen[0][1]) == want and code in (None, seen[0][0])

        wait_until(reached, timeout, f"cluster status to show {want}")
        return seen[0][1]

    def wait_all_healthy(self, timeout: float = 60) -> dict[str, Any]:
        return self.wait_states({1: "healthy", 2: "healthy", 3: "healthy"}, timeout, code=0)

    def cli(self, i: int, *args: str) -> subprocess.CompletedProcess[str]:
        return self.nodes[i].cli(*args, timeout=60)

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()
        self.nats.stop()
