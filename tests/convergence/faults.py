"""The seeded fault schedule and the thread that applies it.

A fault is applied at its time during the write phase and healed after its duration (the heal is
in a ``finally``, so a run that stops early heals too). Kinds:

- ``kill``: SIGKILL a node, leave it down a while (its application keeps writing), restart it;
- ``stop``: SIGSTOP a node, SIGCONT it later;
- ``nats``: stop the nats-server (or, embedded, kill one node's server), start it again;
- ``lock``: the application on a node holds the write lock longer than the node's busy timeout;
- ``rollover_stop`` / ``rollover_kill``: SIGSTOP (or SIGKILL) a node for most of the run while
  the others write more than the streams keep (profile ``rollover`` sets a small ``max_entries``);
- ``restore``: the operator's forced restore: stop a node (its application closes the database
  meanwhile), ``harmonylite snapshot restore`` in place, start it again;
- ``disk``: fill the file system a node's database is on (a small tmpfs; root only), free it later;
- ``clone``, ``reshard``, ``idle``: what an operator does (:mod:`.operations`): a new node from
  a copy of a node's database, the shard count changed with every node stopped, every
  application idle for longer than the health limit.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Cluster(Protocol):
    size: int

    def kill(self, i: int) -> None: ...
    def restart(self, i: int) -> None: ...
    def pause(self, i: int) -> None: ...
    def resume(self, i: int) -> None: ...
    def nats_down(self, i: int) -> None: ...
    def nats_up(self, i: int) -> None: ...
    def db(self, i: int) -> Path: ...
    def provision(self) -> None: ...
    def forced_restore(self, i: int) -> None: ...
    def fill_disk(self, i: int) -> None: ...
    def free_disk(self, i: int) -> None: ...
    def clone(self, i: int) -> None: ...
    def reshard(self) -> None: ...
    def idle(self, seconds: float) -> None: ...


@dataclass(frozen=True)
class Fault:
    at: float
    kind: str
    node: int  # index of the node it hits
    duration: float

    def describe(self) -> str:
        return f"t={self.at:5.1f}s {self.kind:<13} node {self.node + 1} for {self.duration:.1f}s"


# Run beside the short faults, each in its own thread.
LONG = ("rollover_stop", "rollover_kill", "lock", "provision", "restore", "disk", "clone",
        "reshard", "idle")
BUSY_TIMEOUT_S = 10.0  # the node's PRAGMA busy_timeout
IDLE_SECONDS = 6.5


def schedule(seed: int, kinds: tuple[str, ...], seconds: float, nodes: int) -> list[Fault]:
    rng = random.Random(seed ^ 0x5EED)
    if not kinds:
        return []
    faults: list[Fault] = []
    for kind in ("rollover_stop", "rollover_kill"):
        if kind in kinds:
            faults.append(Fault(1.0, kind, rng.randrange(nodes), seconds * 0.7))
    if "lock" in kinds:
        faults.append(Fault(seconds * 0.2, "lock", rng.randrange(nodes), BUSY_TIMEOUT_S + 3))
    if "provision" in kinds:  # a brand-new node joins mid-run, from the newest snapshot
        faults.append(Fault(round(seconds * rng.uniform(0.4, 0.6), 2), "provision", nodes, 0.0))
    if "restore" in kinds:  # once snapshots exist
        faults.append(Fault(round(seconds * rng.uniform(0.35, 0.6), 2), "restore",
                            rng.randrange(nodes), 0.0))
    if "disk" in kinds:
        faults.append(Fault(round(seconds * rng.uniform(0.2, 0.4), 2), "disk",
                            rng.randrange(nodes), round(seconds * 0.3, 2)))
    if "clone" in kinds:  # a copy of a running node's database, its application writing
        faults.append(Fault(round(seconds * rng.uniform(0.25, 0.4), 2), "clone",
                            rng.randrange(nodes), 0.0))
    if "reshard" in kinds:  # every node stopped, the new count applied, every node started
        faults.append(Fault(round(seconds * rng.uniform(0.35, 0.5), 2), "reshard", 0, 0.0))
    if "idle" in kinds:  # longer than the health limit of the idle profile (3 x 1.5 s)
        faults.append(Fault(round(seconds * rng.uniform(0.25, 0.35), 2), "idle", 0,
                            IDLE_SECONDS))
    others = [k for k in kinds if k not in LONG]
    t = 1.0 + rng.uniform(0, 2)
    while others and t < seconds - 3:
        kind = rng.choice(others)
        duration = rng.uniform(1.0, 3.0) if kind != "kill" else rng.uniform(0.5, 3.0)
        duration = min(duration, seconds - 1 - t)
        faults.append(Fault(round(t, 2), kind, rng.randrange(nodes), round(duration, 2)))
        t += duration + rng.uniform(1.5, 4.0)
    return sorted(faults, key=lambda f: f.at)


class FaultRunner(threading.Thread):
    def __init__(self, cluster: Cluster, faults: list[Fault], t0: float,
                 stop: threading.Event) -> None:
        super().__init__(name="faults", daemon=True)
        self.cluster, self.faults, self.t0, self.stop = cluster, faults, t0, stop
        self.applied: list[str] = []
        self.error: BaseException | None = None
        self._threads: list[threading.Thread] = []

    def run(self) -> None:
        try:
            for f in self.faults:
                if self.stop.wait(max(0.0, self.t0 + f.at - time.monotonic())):
                    break
                if f.kind in LONG:
                    th = threading.Thread(target=self._guarded, args=(f,), daemon=True)
                    th.start()
                    self._threads.append(th)
                else:
                    self.apply(f)
            for th in self._threads:
                th.join()
        except BaseException as exc:
            self.error = exc

    def _guarded(self, f: Fault) -> None:
        try:
            self.apply(f)
        except BaseException as exc:
            self.error = exc

    def apply(self, f: Fault) -> None:
        c = self.cluster
        self.applied.append(f.describe())
        if f.kind in ("kill", "rollover_kill"):
            c.kill(f.node)
            try:
                self.stop.wait(f.duration)
            finally:
                c.restart(f.node)
        elif f.kind in ("stop", "rollover_stop"):
            c.pause(f.node)
            try:
                time.sleep(f.duration)  # the fault's length, not a synchronisation
            finally:
                c.resume(f.node)
        elif f.kind == "nats":
            c.nats_down(f.node)
            try:
                time.sleep(f.duration)
            finally:
                c.nats_up(f.node)
        elif f.kind == "lock":
            hold_write_lock(c.db(f.node), f.duration)
        elif f.kind == "provision":
            c.provision()
        elif f.kind == "restore":
            c.forced_restore(f.node)
        elif f.kind == "disk":
            try:  # freed even when filling fails part-way
                c.fill_disk(f.node)
                self.stop.wait(f.duration)
            finally:
                c.free_disk(f.node)
        elif f.kind == "clone":
            c.clone(f.node)
        elif f.kind == "reshard":
            c.reshard()
        elif f.kind == "idle":
            c.idle(f.duration)
        else:
            raise ValueError(f.kind)


def hold_write_lock(db: Path, seconds: float) -> None:
    """The application's long transaction: BEGIN IMMEDIATE, hold, roll back."""
    conn = sqlite3.connect(db, isolation_level=None, timeout=30)
    try:
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()
