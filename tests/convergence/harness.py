"""A cluster of real node processes driven by a seed: write phase with faults, quiescence, verdict.

By default the nodes share one external nats-server; ``embedded=True`` gives every node its own
embedded server, clustered through ``-cluster-addr`` / ``-cluster-peers``. Every process started
here is stopped by its PID in ``close()``, also when the run fails.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import archive_check, faults, gaps, oracle, schema
from .profiles import Profile
from .workload import History, Writer

DISK_MB = 96  # each node's file system under the ``disk`` fault


class DiskFaultUnavailable(RuntimeError):
    """The ``disk`` fault needs root (a tmpfs mount)."""


_TESTS = str(Path(__file__).resolve().parent.parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from nodes import NodeProc  # noqa: E402
from servers import NatsServer, free_port  # noqa: E402

from . import operations  # noqa: E402


@dataclass
class Result:
    seed: int
    profile: str
    nodes: int
    write_seconds: float
    counts: dict[str, int]
    faults: list[str]
    failures: list[oracle.Failure]
    quiesce_seconds: float
    rows: int
    replay: str
    notes: list[str] = field(default_factory=list)
    lagging: list[str] = field(default_factory=list)  # nodes judged by the gap promise

    @property
    def ok(self) -> bool:
        return not self.failures


def replay_command(seed: int, profile: str, nodes: int, seconds: float, embedded: bool) -> str:
    cmd = (f".venv/bin/python -m tests.convergence --seed {seed} --profile {profile} "
           f"--nodes {nodes} --seconds {seconds:g}")
    return cmd + (" --embedded" if embedded else "")


class Harness:
    def __init__(self, workdir: Path, profile: Profile, seed: int, size: int = 3,
                 embedded: bool = False, shards: int = 2) -> None:
        self.workdir, self.profile, self.seed, self.size = workdir, profile, seed, size
        self.embedded = embedded or profile.embedded
        self.server: NatsServer | None = None
        self.nodes: list[NodeProc] = []
        self.history = History()
        self.paused: set[int] = set()
        self.down: set[int] = set()
        self.dead: list[str] = []
        self._locks = [threading.Lock() for _ in range(size)]
        self._shards = shards
        self.node_cfg: dict[str, Any] = {}
        self.stop_event: threading.Event | None = None  # the write phase's, once it runs
        self.t0 = 0.0
        self.operator_outcomes: list[str] = []  # what the operator's commands answered
        self.idle_unhealthy: list[str] = []  # health answers other than 200 while idle
        self.writers: list[Writer] = []
        self.mounts: list[Path] = []  # small file systems of the ``disk`` fault
        self.restore_outcomes: list[str] = []
        self.health_urls: list[str] = []  # each node's detailed health endpoint
        self.rolled_over: set[int] = set()  # nodes taken down while the streams rolled over

    # --- cluster control (faults.Cluster) ------------------------------------------------
    def db(self, i: int) -> Path:
        return self.nodes[i].db

    def kill(self, i: int) -> None:
        with self._locks[i]:
            self.nodes[i].kill()
            self.down.add(i)

    def restart(self, i: int) -> None:
        with self._locks[i]:
            node = self.nodes[i]
            if node.proc is not None and node.proc.poll() is None:
                node.stop()
            node.start(120)
            self.down.discard(i)

    def pause(self, i: int) -> None:
        with self._locks[i]:
            proc = self.nodes[i].proc
            if proc is not None and proc.poll() is None:
                os.kill(proc.pid, signal.SIGSTOP)
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGSTOP)
                self.paused.add(i)

    def resume(self, i: int) -> None:
        with self._locks[i]:
            proc = self.nodes[i].proc
            if proc is not None and proc.poll() is None:
                for child in _children(proc.pid):
                    os.kill(child, signal.SIGCONT)
                os.kill(proc.pid, signal.SIGCONT)
            self.paused.discard(i)

    def provision(self) -> None:
        """A brand-new node with no database: it restores the newest snapshot and catches up
        (external nats-server only). It joins the oracle's judgement, not the writers."""
        i = len(self.nodes)
        node = NodeProc(self.workdir / f"node{i + 1}", i + 1,
                        {**self.node_cfg, "health_check": self.health_cfg()})
        node.start(120)
        self.add_node(node)

    def forced_restore(self, i: int) -> None:
        """What an operator does to a node: stop it, ``snapshot restore`` its database in place
        (its pending changes are published first), start it. The application closes the
        database meanwhile (the restore refuses while it is open)."""
        # An operator restores from a snapshot that exists: wait for the first one (the leader
        # takes it within seconds of start; slower on a loaded machine).
        store = self.workdir / "snapshots"
        deadline = time.monotonic() + 60
        while not any(store.rglob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling the shared file store, bounded by the deadline
        writer = self.writers[i] if i < len(self.writers) else None
        if writer is not None:
            writer.close_database()
        try:
            with self._locks[i]:
                node = self.nodes[i]
                self.down.add(i)
                node.stop(timeout=30)
                out = node.cli("snapshot", "restore", "latest")
                self.restore_outcomes.append(
                    f"node {i + 1}: snapshot restore exit {out.returncode}: "
                    f"{out.stdout.strip() or out.stderr.strip()[-300:]}")
                node.start(120)
                self.down.discard(i)
        finally:
            if writer is not None:
                writer.reopen_database()

    def add_node(self, node: NodeProc) -> None:
        self.nodes.append(node)
        self._locks.append(threading.Lock())

    @contextlib.contextmanager
    def all_locks(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for lock in list(self._locks):
                stack.enter_context(lock)
            yield

    def clone(self, i: int) -> None:
        operations.clone(self, i)

    def reshard(self) -> None:
        operations.reshard(self, self.profile.reshard_to)

    def idle(self, seconds: float) -> None:
        operations.idle(self, seconds)

    def _filler(self, i: int) -> Path:
        return self.nodes[i].db.parent / "filler"

    def fill_disk(self, i: int) -> None:
        """Take every free byte of the file system node ``i``'s database is on."""
        if not self.mounts:
            raise RuntimeError("the disk fault needs the databases on small file systems")
        # ENOSPC is the point wherever it comes from: the write, the open (the node's own writes
        # may fill the disk first) or the close (a buffered file flushes what it kept). One
        # that escaped here once failed the run as a harness error with the disk left full.
        block = b"\0" * (1 << 20)
        try:
            with self._filler(i).open("wb", buffering=0) as f:
                while True:
                    f.write(block)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise

    def free_disk(self, i: int) -> None:
        self._filler(i).unlink(missing_ok=True)

    def _mount_small_disk(self, where: Path) -> Path:
        where.mkdir(parents=True, exist_ok=True)
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs",
                              str(where)], capture_output=True, text=True)
        if out.returncode != 0:
            raise DiskFaultUnavailable(f"cannot mount a tmpfs (needs root): {out.stderr}")
        self.mounts.append(where)
        return where

    def nats_down(self, i: int) -> None:
        if self.server is not None:
            self.server.stop()
            return
        proc = self.nodes[i].proc  # embedded: kill this node's server; the node restarts it
        if proc is not None:
            for child in _children(proc.pid):
                os.kill(child, signal.SIGKILL)

    def nats_up(self, i: int) -> None:
        if self.server is not None and self.server.proc is None:
            self.server.start()

    def health_cfg(self) -> dict[str, Any]:
        port = free_port()
        self.health_urls.append(f"http://127.0.0.1:{port}/health")
        return {"enable": True, "bind": f"127.0.0.1:{port}", "detailed": True}

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        extra_cfg: dict[str, Any] = {k: v for k, v in self.profile.node_config.items()
                                     if k != "replication_log"}
        snap = extra_cfg.get("snapshot")
        if snap and snap.get("store") == "file":  # one directory every node shares
            extra_cfg["snapshot"] = {**snap, "file": {"path": str(self.workdir / "snapshots")}}
        rlog = {"shards": self._shards, **self.profile.node_config.get("replication_log", {})}
        cluster_ports = [free_port() for _ in range(self.size)]
        if not self.embedded:
            self.server = NatsServer(self.workdir / "nats-store").start()
        for i in range(self.size):
            args: list[str] = []
            if self.server is not None:
                nats_cfg: dict[str, Any] = {"urls": [self.server.url]}
            else:
                nats_cfg = {"bind_address": "127.0.0.1:-1"}
                peers = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(cluster_ports)
                                 if j != i)
                args = ["-cluster-addr", f"127.0.0.1:{cluster_ports[i]}", "-cluster-peers", peers]
            cfg = {"nats": nats_cfg, "replication_log": rlog, **extra_cfg}
            self.node_cfg = cfg
            env = ({"HARMONYLITE_TEST_CLOCK_OFFSET": str(self.profile.clock_offset)}
                   if i == 0 and self.profile.clock_offset else None)
            node_cfg = {**cfg, "health_check": self.health_cfg()}
            if "disk" in self.profile.faults:  # the database alone on a small file system
                disk = self._mount_small_disk(self.workdir / f"node{i + 1}" / "disk")
                node_cfg = {**node_cfg, "db_path": str(disk / "data.db")}
            node = NodeProc(self.workdir / f"node{i + 1}", i + 1, node_cfg, extra_args=args,
                            env=env)
            node.db = Path(str(node_cfg.get("db_path", node.db)))
            conn = sqlite3.connect(node.db, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            schema.create_schema(conn, self.profile.features)
            conn.close()
            self.nodes.append(node)
        for node in self.nodes:
            node.start_async()
        for node in self.nodes:
            node.wait_started(120)

    def close(self) -> None:
        for i in list(self.paused):
            self.resume(i)
        for node in self.nodes:
            try:
                node.stop(timeout=20)
            except Exception:
                if node.proc is not None:
                    node.proc.kill()
                    node.proc.wait(10)
                    node.proc = None
        if self.server is not None:
            self.server.stop()
        for where in self.mounts:
            subprocess.run(["umount", "-l", str(where)], check=False)
        self.mounts = []

    # --- the run -------------------------------------------------------------------------
    def run(self, write_seconds: float, quiesce_deadline: float = 180.0) -> Result:
        self.profile = replace(self.profile, write_seconds=write_seconds)
        stop = threading.Event()
        t0 = time.monotonic()
        self.stop_event, self.t0 = stop, t0
        on_mig = self.restart if self.profile.restart_after_migration else None
        writers = [Writer(i, n.db, self.profile, self.seed, self.history, stop, t0, on_mig)
                   for i, n in enumerate(self.nodes)]
        self.writers = writers
        plan = faults.schedule(self.seed, self.profile.faults, write_seconds, self.size)
        self.rolled_over = {f.node for f in plan if f.kind in ("rollover_kill", "rollover_stop")}
        runner = faults.FaultRunner(self, plan, t0, stop)
        for w in writers:
            w.start()
        runner.start()
        stop.wait(write_seconds)  # the write phase's length
        stop.set()
        for w in writers:
            w.join(300)  # a writer finishing its migrations restarts its node (schema_restart)
        runner.join(120)
        notes = [f"writer {w.name}: {w.error!r}" for w in writers if w.error is not None]
        if runner.error is not None:
            notes.append(f"fault runner: {runner.error!r}")
        q0 = time.monotonic()
        self.heal()
        dumps, pendings = self.quiesce(quiesce_deadline)
        removed = set().union(*(oracle.displaced(n.db) for n in self.nodes))
        reports = [gaps.collect(i + 1, n.db, n.log_text(), self.health_urls[i],
                                i in self.rolled_over)
                   for i, n in enumerate(self.nodes)]
        snapshots = bool(self.profile.node_config.get("snapshot", {}).get("enabled"))
        lagging: list[str] = []
        failures = oracle.check_all(dumps, pendings, self.history, self.dead, removed,
                                    reports, snapshots, lagging)
        if "framework" in self.profile.features:
            failures += oracle.check_bookkeeping([n.db for n in self.nodes[:len(writers)]],
                                                 [w.migrated for w in writers])
        if "fts" in self.profile.features:
            failures += oracle.check_indexes([n.db for n in self.nodes])
        if self.profile.node_config.get("snapshot", {}).get("archive") and not failures:
            failures += archive_check.check(self.nodes[0], dumps[0], self.workdir)
        if notes:
            failures.append(oracle.Failure("harness", "the harness itself failed", notes))
        if failures:  # is what diverged visible to an operator?
            notes = notes + [f"node {i + 1}: {oracle.visibility(n.db, n.log_path)}"
                             for i, n in enumerate(self.nodes)]
        counts = dict(self.history.counts)
        counts["restores"] = sum(n.log_text().count("Snapshot restored") for n in self.nodes)
        if self.idle_unhealthy:
            failures.append(oracle.Failure("idle-healthy", "a node was unhealthy while the "
                                           "cluster was idle", self.idle_unhealthy[:12]))
        failed = [o for o in self.operator_outcomes if " exit 0:" not in o]
        if failed:
            failures.append(oracle.Failure("operator", "an operator's command failed", failed))
        if self.restore_outcomes:
            counts["forced restores"] = len(self.restore_outcomes)
            failed = [o for o in self.restore_outcomes if " exit 0:" not in o]
            if failed:  # an operator's restore that fails is a finding too
                failures.append(oracle.Failure("forced-restore",
                                               "snapshot restore failed", failed))
        return Result(self.seed, self.profile.name, self.size, write_seconds,
                      counts, runner.applied, failures,
                      time.monotonic() - q0, sum(len(r) for _, r in dumps[0].values()),
                      replay_command(self.seed, self.profile.name, self.size, write_seconds,
                                     self.embedded), notes, lagging)

    def heal(self) -> None:
        for i in list(self.paused):
            self.resume(i)
        if self.server is not None and self.server.proc is None:
            self.server.start()
        for i, node in enumerate(self.nodes):
            if node.proc is None or node.proc.poll() is not None:
                if i not in self.down:
                    self.dead.append(f"node {i + 1} exited; log tail: "
                                     f"{node.log_text()[-400:]!r}")
                self.restart(i)

    def quiesce(self, deadline_s: float, stable_s: float = 12.0
                ) -> tuple[list[oracle.Dump], list[int]]:
        """Wait until every change is published and the nodes agree, or nothing moves."""
        deadline = time.monotonic() + deadline_s
        last: tuple[list[oracle.Dump], list[int]] | None = None
        last_change = time.monotonic()
        while True:
            state = ([oracle.dump(n.db) for n in self.nodes], [oracle.pending(n.db)
                                                               for n in self.nodes])
            dumps, pendings = state
            if not any(pendings) and all(d == dumps[0] for d in dumps[1:]) and state == last:
                return state
            if state != last:
                last, last_change = state, time.monotonic()
            now = time.monotonic()
            if now - last_change > stable_s or now > deadline:
                return state
            time.sleep(1.0)  # poll interval; the exit conditions above are the deadlines


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                out += [int(x) for x in fh.read().split()]
    except OSError:
        pass
    return out
