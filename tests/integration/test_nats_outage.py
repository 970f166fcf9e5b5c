"""Nodes started while their external NATS server is down: they start anyway, capture the
application's writes, say why in health, and catch up once NATS is back."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, v TEXT)"
PENDING = ("SELECT count(*) FROM __harmonylite__log WHERE id > "
           "(SELECT v FROM __harmonylite__state WHERE k = 'published')")


def node_cfg(url: str, health_port: int | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "nats": {"urls": [url], "connect_retries": 1, "reconnect_wait_seconds": 1},
        "replication_log": {"shards": 1},
        **extra,
    }
    if health_port is not None:
        cfg["health_check"] = {"enable": True, "bind": f"127.0.0.1:{health_port}"}
    return cfg


def health(port: int) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def wait_reason(node: NodeProc, port: int, text: str, timeout: float = 60) -> None:
    """Health answers 503 with a reason containing ``text`` (the node stays alive)."""
    seen: list[tuple[int, dict[str, Any]]] = []

    def check() -> bool:
        assert node.proc is not None and node.proc.poll() is None, \
            f"node {node.node_id} exited:\n{node.log_text()[-3000:]}"
        seen.append(health(port))
        code, body = seen[-1]
        return code == 503 and any(text in r for r in body.get("reasons", ()))

    try:
        wait_until(check, timeout, f"health to say {text!r}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last answer {seen[-1:]}; log:\n"
                             f"{node.log_text()[-3000:]}") from None


def items(node: NodeProc) -> list[tuple[Any, ...]]:
    return node.query("SELECT id, v FROM items ORDER BY id")


def test_node_restarted_while_nats_is_down_captures_then_publishes_when_it_is_back(
        tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "ns").start()
    port = free_port()
    a = NodeProc(tmp_path / "a", 1, node_cfg(server.url, port))
    b = NodeProc(tmp_path / "b", 2, node_cfg(server.url))
    try:
        for n in (a, b):
            n.execute(SCHEMA)
            n.start()
        a.execute("INSERT INTO items VALUES (1, 'before')")
        wait_until(lambda: items(b) == [(1, "before")], 20, "b to replicate row 1")
        assert a.stop() == 0
        server.stop()

        mark = len(a.log_text())
        a.start_async()
        down_since = time.monotonic()
        wait_reason(a, port, f"NATS unreachable at {server.url}: connection refused")
        # The application keeps writing: every change is captured and stays pending.
        conn = a.connect()
        try:
            for i in range(2, 12):
                conn.execute("INSERT INTO items VALUES (?, 'during')", (i,))
        finally:
            conn.close()
        assert a.query(PENDING) == [(10,)]
        # An outage longer than the start-up attempts (connect_retries) took: still up, still
        # saying why.
        wait_until(lambda: time.monotonic() - down_since > 20, 30, "a 20 s outage")
        wait_reason(a, port, f"NATS unreachable at {server.url}: connection refused", 5)

        server.start()  # the same port
        wait_until(lambda: len(items(b)) == 11, 60, "b to receive what a captured meanwhile")
        assert items(b) == items(a)
        wait_until(lambda: health(port)[0] == 200, 60, "a healthy once NATS is back")
        assert a.query(PENDING) == [(0,)]
        log = a.log_text()[mark:]
        assert log.count("NATS unreachable at") == 1, log  # the outage is logged once...
        assert "connected to NATS" in log and "node started" in log  # ...and its end
        a.execute("INSERT INTO items VALUES (12, 'after')")
        wait_until(lambda: len(items(b)) == 12, 20, "replication after the outage")
        assert a.stop() == 0
    finally:
        for n in (a, b):
            n.stop()
        server.stop()


def test_sigterm_while_waiting_for_nats_exits_promptly(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    old = NodeProc(tmp_path / "old", 1, node_cfg(url, port))
    old.execute(SCHEMA)
    old.start_async()
    wait_reason(old, port, f"NATS unreachable at {url}: connection refused")
    started = time.monotonic()
    assert old.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 10

    # A brand-new node (no database) waits for NATS before creating one: it may have to be
    # provisioned from a snapshot.
    port = free_port()
    new = NodeProc(tmp_path / "new", 2, node_cfg(url, port, snapshot={
        "enabled": True, "store": "file", "file": {"path": str(tmp_path / "store")}}))
    new.start_async()
    wait_reason(new, port, f"NATS unreachable at {url}: connection refused")
    assert not new.db.exists()
    started = time.monotonic()
    assert new.stop(signal.SIGTERM, timeout=30) == 0
    assert time.monotonic() - started < 10
    assert not new.db.exists()


def test_new_node_started_while_nats_is_down_is_provisioned_when_it_is_back(
        tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "ns").start()
    store = tmp_path / "store"
    store.mkdir()
    snap = {"enabled": True, "store": "file", "file": {"path": str(store)}, "interval": 0,
            "leader_ttl": 3_600_000}
    a = NodeProc(tmp_path / "a", 1, node_cfg(server.url, snapshot=snap))
    port = free_port()
    c = NodeProc(tmp_path / "c", 3, node_cfg(server.url, port, snapshot=snap))
    try:
        a.execute(SCHEMA)
        a.start()
        for i in range(1, 6):
            a.execute("INSERT INTO items VALUES (?, 'x')", (i,))
        saved = subprocess.run([sys.executable, "-m", "harmonylite", "-config",
                                str(a.config_path), "snapshot", "save"],
                               capture_output=True, text=True, timeout=120)
        assert saved.returncode == 0, saved.stderr
        snapshot_id = saved.stdout.strip()
        assert a.stop() == 0
        server.stop()

        c.start_async()
        wait_reason(c, port, f"NATS unreachable at {server.url}: connection refused")
        assert not c.db.exists()
        server.start()
        c.wait_started(90)
        assert f"Snapshot restored {snapshot_id}" in c.log_text()
        assert len(items(c)) == 5
        assert c.stop() == 0
    finally:
        for n in (a, c):
            n.stop()
        server.stop()


def test_refused_credentials_still_end_the_node(tmp_path: Path) -> None:
    """Credentials the server refuses are a configuration error: no amount of waiting fixes
    them, so the node says so and exits 1 once its connect_retries are spent."""
    server = NatsServer(tmp_path / "ns", extra_args=["--user", "harmony",
                                                     "--pass", "pw-Zq81xx"]).start()
    try:
        bad = NodeProc(tmp_path / "bad", 1, {"nats": {
            "urls": [server.url], "user_name": "harmony", "user_password": "wrong-pw-77",
            "connect_retries": 1, "reconnect_wait_seconds": 1}})
        bad.execute(SCHEMA)
        bad.start_async()
        assert bad.proc is not None
        assert bad.proc.wait(60) == 1
        text = bad.log_text()
        assert "authorization" in text.lower(), text
        assert "wrong-pw-77" not in text
    finally:
        server.stop()
