"""Health endpoint and metrics of a running node, over loopback HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port


def test_health_follows_nats_and_metrics_move(tmp_path: Path, nats_server: NatsServer) -> None:
    health_port, metrics_port = free_port(), free_port()
    node = NodeProc(tmp_path / "n1", 1, {
        "nats": {"urls": [nats_server.url], "reconnect_wait_seconds": 0},
        "health_check": {"enable": True, "bind": f"127.0.0.1:{health_port}"},
        "prometheus": {"enable": True, "bind": f"127.0.0.1:{metrics_port}",
                       "namespace": "hl"},
        "logging": {"format": "json"},
    })
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    node.start()
    health = f"http://127.0.0.1:{health_port}/health"
    metrics = f"http://127.0.0.1:{metrics_port}/metrics"

    def status() -> tuple[int, dict[str, object]]:
        r = httpx.get(health, timeout=5)
        return r.status_code, r.json()

    code, body = status()
    assert code == 200, body
    for key in ("status", "node_id", "uptime_seconds", "db_connected", "nats_connected",
                "cdc_installed", "tables_tracked", "last_replicated_event_timestamp",
                "last_published_event_timestamp", "version", "snapshot"):
        assert key in body
    assert body["node_id"] == 1 and body["tables_tracked"] == 1
    assert set(body["snapshot"]) >= {"leader", "last_id", "last_at", "age_seconds",  # type: ignore[arg-type]
                                     "last_error"}

    text = httpx.get(metrics, timeout=5).text
    for name in ("hl_snapshot_age_seconds", "hl_snapshot_duration_seconds", "hl_snapshot_bytes",
                 "hl_snapshot_failures_total", "hl_snapshot_leader", "hl_published_total",
                 "hl_replicated_total", "hl_pending_publish"):
        assert name in text

    def counter(name: str) -> float:
        for line in httpx.get(metrics, timeout=5).text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not exposed")

    for i in range(5):
        node.execute("INSERT INTO t VALUES (?, 'x')", (i,))
    wait_until(lambda: counter("hl_published_total") >= 5 and counter("hl_replicated_total") >= 5,
               15, "metrics to move")

    nats_server.stop()
    wait_until(lambda: status()[0] == 503, 15, "503 while NATS is down")
    assert status()[1]["nats_connected"] is False
    nats_server.start()
    wait_until(lambda: status()[0] == 200, 30, "200 once NATS is back")
    assert node.stop() == 0
    # JSON logs: one object per line, each with the node id.
    import json

    for line in node.log_text().splitlines():
        obj = json.loads(line)
        assert obj["node_id"] == 1 and obj["message"] and obj["level"] and obj["time"]


def test_sleep_timeout_stops_an_idle_node(tmp_path: Path, nats_server: NatsServer) -> None:
    node = NodeProc(tmp_path / "n1", 1, {"nats": {"urls": [nats_server.url]},
                                         "sleep_timeout": 1500})
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    node.start()
    node.execute("INSERT INTO t VALUES (1)")
    assert node.proc is not None
    assert node.proc.wait(30) == 0  # exits on its own, cleanly
    assert "sleep_timeout" in node.log_text()
