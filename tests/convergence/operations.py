"""What operators do to a running cluster besides faults: clone a node's database to make
another node, change the shard count, and leave the cluster idle.

- ``clone``: a new node whose database is a copy of a running node's (SQLite's backup API, as a
  VM image or a ``cp`` of a quiet file would give), with a node_id of its own; its application
  writes from then on, like the others';
- ``reshard``: the documented procedure (operator guide, "Changing the shard count"): every node
  stopped, ``shared-settings apply`` with the new count, every node started on it; the
  applications keep writing to their databases meanwhile;
- ``idle``: every application stops writing for a while, longer than the health check's snapshot
  limit; every node's health must stay 200 throughout (an idle database is healthy).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .workload import Writer

if TYPE_CHECKING:
    from .harness import Harness

_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from nodes import NodeProc, write_toml  # noqa: E402

IDLE_POLL = 0.5  # seconds between health looks during an idle spell


def clone(h: Harness, source: int) -> None:
    """A new node started from a copy of node ``source``'s database."""
    i = len(h.nodes)
    node = NodeProc(h.workdir / f"node{i + 1}", i + 1,
                    {**h.node_cfg, "health_check": h.health_cfg()})
    src = sqlite3.connect(h.nodes[source].db, timeout=30)
    dst = sqlite3.connect(node.db)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    node.start(120)
    h.add_node(node)
    assert h.stop_event is not None
    writer = Writer(i, node.db, h.profile, h.seed, h.history, h.stop_event, h.t0)
    h.writers.append(writer)
    writer.start()


def reshard(h: Harness, shards: int) -> None:
    """Every node stopped, the new count applied once, every node started on it."""
    with h.all_locks():
        h.down.update(range(len(h.nodes)))
        for node in h.nodes:
            node.stop(timeout=30)
        for node in h.nodes:
            cfg = tomllib.loads(node.config_path.read_text())
            cfg["replication_log"] = {**cfg.get("replication_log", {}), "shards": shards}
            write_toml(node.config_path, cfg)
        h.node_cfg = {**h.node_cfg, "replication_log": {
            **h.node_cfg.get("replication_log", {}), "shards": shards}}
        out = h.nodes[0].cli("shared-settings", "apply")
        h.operator_outcomes.append(f"shared-settings apply (shards = {shards}): exit "
                                   f"{out.returncode}: {(out.stdout + out.stderr).strip()[-300:]}")
        for node in h.nodes:
            node.start_async()
        for node in h.nodes:
            node.wait_started(120)
        h.down.difference_update(range(len(h.nodes)))


def idle(h: Harness, seconds: float) -> None:
    """Every application stops writing for ``seconds``; each node's health is watched."""
    writers = list(h.writers)
    for w in writers:
        w.close_database()  # waits for the transaction under way
    try:
        began = time.monotonic()
        while time.monotonic() - began < seconds:
            for n, url in enumerate(h.health_urls):
                code, reasons = _health(url)
                if code != 200:
                    h.idle_unhealthy.append(f"node {n + 1} at {time.monotonic() - began:.1f} s "
                                            f"of an idle spell: {code} {reasons}")
            threading.Event().wait(IDLE_POLL)  # the polling period of the watch
    finally:
        for w in writers:
            w.reopen_database()


def _health(url: str) -> tuple[int, list[Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, list(json.loads(r.read()).get("reasons") or [])
    except urllib.error.HTTPError as exc:
        return exc.code, list(json.loads(exc.read()).get("reasons") or [])
    except OSError as exc:
        return 0, [str(exc)]
