"""Longest write→visible gap per fault on a three-server JetStream cluster (issue 15).

Three real nats-servers (R3 streams, KV and object store, two shards) and three nodes, each
inserting a row every 50 ms; a probe reads every node's newest row per writer every 100 ms. Each
fault runs in turn while the writes go on; for each, the script prints the election time (kill →
the cluster serves the streams again: a leader outside the dead servers and a consumer can be
created) and the longest gap between a row's write and its appearance on another node.
Target: gap <= election + 2 s. Usage: ``python bench/cluster_stall.py [rounds]``.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

_spec = importlib.util.spec_from_file_location(
    "cluster_scenarios", ROOT / "tests" / "integration" / "test_jetstream_cluster.py")
assert _spec is not None and _spec.loader is not None
scenarios = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(scenarios)
Rig = scenarios.Rig


def kill_leader(rig: Any, server: int, what: str) -> tuple[str, float, float]:
    rig.move_leaders(server)
    rig.converge("before")
    rig.work.window()
    started = time.monotonic()
    rig.cluster.kill(server)
    election = rig.election({server}, started)
    rig.converge("after")
    gap = rig.work.window()
    rig.cluster.restart(server)
    rig.cluster.wait_ready()
    return what, election, gap


def rolling(rig: Any) -> tuple[str, float, float]:
    rig.converge("before")
    rig.work.window()
    for i in range(3):
        rig.cluster.servers[i].stop()
        rig.cluster.restart(i)
        rig.cluster.wait_ready()
        rig.work.wait_visible(60, f"server {i}")
    return "rolling restart (SIGTERM, one at a time)", 0.0, rig.work.window()


def quorum(rig: Any, seconds: float = 15.0) -> tuple[str, float, float]:
    rig.converge("before")
    rig.work.window()
    rig.cluster.kill(1)
    rig.cluster.kill(2)
    time.sleep(seconds)  # the outage being measured, not a synchronisation
    started = time.monotonic()
    rig.cluster.restart(1)
    rig.cluster.restart(2)
    election = rig.election(set(), started)
    rig.converge("after", timeout=120)
    gap = rig.work.window()
    return f"quorum lost {seconds:.0f} s (gap includes the outage)", election, gap


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    results: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):
        rig = Rig(Path(tempfile.mkdtemp(prefix="hl-cluster-bench-")))
        try:
            rig.converge("start")
            for what, election, gap in (
                kill_leader(rig, 2, "SIGKILL stream leader, no node on it"),
                kill_leader(rig, 0, "SIGKILL the server node 1 uses (leads both streams)"),
                rolling(rig),
                quorum(rig),
            ):
                print(f"{what}: election {election:.1f} s, longest write→visible {gap:.1f} s",
                      flush=True)
                results.setdefault(what, []).append((election, gap))
        finally:
            rig.close()
    print("\n| fault | election (s) | longest write→visible (s) |\n|---|---|---|")
    for what, runs in results.items():
        el = statistics.median(e for e, _ in runs)
        gap = statistics.median(g for _, g in runs)
        print(f"| {what} | {el:.1f} | {gap:.1f} (runs: "
              f"{', '.join(f'{g:.1f}' for _, g in runs)}) |")


if __name__ == "__main__":
    main()
