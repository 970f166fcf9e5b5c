"""harmonylite nodes run as real processes for the integration tests."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_toml(path: Path, data: dict[str, Any]) -> None:
    lines: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    for k, v in data.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {toml_value(v)}")
    while tables:
        name, table = tables.pop(0)
        lines.append(f"\n[{name}]")
        for k, v in table.items():
            if isinstance(v, dict):
                tables.append((f"{name}.{k}", v))
            else:
                lines.append(f"{k} = {toml_value(v)}")
    path.write_text("\n".join(lines) + "\n")


def wait_until(pred: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def health(n: NodeProc) -> tuple[int, dict[str, Any]]:
    """GET the node's health endpoint (``health_check.bind`` in its config): the status and the
    JSON body; (0, {}) while nothing answers yet."""
    bind = n.config_path.read_text().split('bind = "')[1].split('"')[0]
    try:
        with urllib.request.urlopen(f"http://{bind}/health", timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    except OSError:
        return 0, {}


# Every node process a test starts, so that one left running by a failed test is stopped.
RUNNING: list[NodeProc] = []


def stop_leftovers() -> None:
    while RUNNING:
        node = RUNNING.pop()
        if node.proc is not None and node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait(10)


class NodeProc:
    def __init__(self, workdir: Path, node_id: int, config: dict[str, Any],
                 extra_args: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.node_id = node_id
        self.db = self.dir / "data.db"
        self.config_path = self.dir / "config.toml"
        cfg = {"db_path": str(self.db), "node_id": node_id, **config}
        cfg.setdefault("snapshot", {"enabled": False})
        write_toml(self.config_path, cfg)
        self.extra_args = extra_args or []
        self.env = env  # extra environment variables for the process
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "node.log"

    def start(self, timeout: float = 60) -> NodeProc:
        self.start_async()
        return self.wait_started(timeout)

    def start_async(self) -> None:
        self._started_marker = self.log_path.read_bytes().count(b"node started") if \
            self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "harmonylite", "-config", str(self.config_path),
             *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, **self.env} if self.env else None,
        )
        RUNNING.append(self)

    def wait_started(self, timeout: float = 60) -> NodeProc:
        try:
            wait_until(lambda: self.log_path.read_bytes().count(b"node started")
                       > self._started_marker or self._dead(), timeout,
                       f"node {self.node_id} to start")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; its log:\n{self.log_text()[-3000:]}") from None
        if self._dead():
            raise RuntimeError(f"node {self.node_id} exited:\n{self.log_text()}")
        return self

    def _dead(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
        code = self.proc.wait(timeout)
        self.proc = None
        return code

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """``harmonylite -config <this node's config> ARGS…`` as an operator runs it."""
        return subprocess.run(
            [sys.executable, "-m", "harmonylite", "-config", str(self.config_path), *args],
            capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.env} if self.env else None)

    def connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=10)
        conn.execute("PRAGMA journal_mode=WAL")
        return conn

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.connect()
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        conn = self.connect()
        try:
            conn.execute(sql, params)
        finally:
            conn.close()
