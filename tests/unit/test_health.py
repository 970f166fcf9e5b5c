"""Health evaluation (pure) and the health endpoint over real loopback HTTP."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from harmonylite import __version__
from harmonylite.config import HealthCheckConfig
from harmonylite.errors import ConfigError
from harmonylite.ops.health import (
    HttpServer,
    Response,
    evaluate,
    parse_bind,
    probe_database,
    rfc3339,
    start_health_server,
    to_epoch,
)

NOW = 1_750_000_000.0
HOUR_MS = 3_600_000
CFG = HealthCheckConfig(enable=True, bind="127.0.0.1:0")


def healthy_status(**changes: Any) -> dict[str, Any]:
    status: dict[str, Any] = {
        "node_id": 7,
        "uptime_seconds": 120.5,
        "db_connected": True,
        "nats_connected": True,
        "cdc_installed": True,
        "tables_tracked": 3,
        "last_replicated_event_timestamp": NOW - 5,
        "last_published_event_timestamp": None,
        "published_total": 10,
        "snapshot": {"leader": True, "last_id": "snap-1", "last_at": NOW - 60,
                     "last_error": None},
    }
    status.update(changes)
    return status


# --- bind -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("bind", "expected"),
    [
        ("0.0.0.0:8090", ("0.0.0.0", 8090)),
        (":3010", (None, 3010)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        (":0", ("0.0.0.0", 0)),
        ("[::1]:9000", ("::1", 9000)),
        ("localhost:80", ("localhost", 80)),
    ],
)
def test_parse_bind(bind: str, expected: tuple[str | None, int]) -> None:
    assert parse_bind(bind) == expected


@pytest.mark.parametrize("bind", ["8090", "host:", "host:70000", "a:b", "", "1.2.3.4:-1"])
def test_parse_bind_rejects(bind: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_bind(bind, "health_check.bind")
    assert err.value.key == "health_check.bind"
    assert "HOST:PORT" in str(err.value)


# --- time values ------------------------------------------------------------------------------
def test_time_values() -> None:
    dt = datetime(2025, 3, 21, 15, 30, 45, 123000, tzinfo=UTC)
    assert to_epoch(dt) == dt.timestamp()
    assert to_epoch("2025-03-21T15:30:45.123Z") == pytest.approx(dt.timestamp())
    assert to_epoch(dt.timestamp()) == dt.timestamp()
    for unknown in (None, 0, "", "not a time", True, float("nan")):
        assert to_epoch(unknown) is None
    assert rfc3339(dt.timestamp()) == "2025-03-21T15:30:45.123Z"
    assert rfc3339(None) is None


# --- evaluate ---------------------------------------------------------------------------------
def test_healthy_body_has_harmonylite_keys() -> None:
    ok, body = evaluate(healthy_status(), CFG, HOUR_MS, True, now=NOW)
    assert ok
    assert body["status"] == "healthy"
    assert body["reasons"] == []
    for key in ("status", "node_id", "uptime_seconds", "db_connected", "nats_connected",
                "cdc_installed", "tables_tracked", "last_replicated_event_timestamp",
                "last_published_event_timestamp", "version", "snapshot"):
        assert key in body
    assert body["node_id"] == 7
    assert body["uptime_seconds"] == 120
    assert body["tables_tracked"] == 3
    assert body["version"] == __version__
    assert body["last_replicated_event_timestamp"] == rfc3339(NOW - 5)
    assert body["last_published_event_timestamp"] is None
    assert body["snapshot"] == {"leader": True, "last_id": "snap-1", "last_at": rfc3339(NOW - 60),
                                "age_seconds": 60.0, "last_error": None}
    assert "published_total" not in body


@pytest.mark.parametrize(
    ("key", "reason"),
    [("db_connected", "database"), ("nats_connected", "NATS"), ("cdc_installed", "capture")],
)
def test_each_check_makes_unhealthy(key: str, reason: str) -> None:
    ok, body = evaluate(healthy_status(**{key: False}), CFG, HOUR_MS, True, now=NOW)
    assert not ok
    assert body["status"] == "unhealthy"
    assert body[key] is False
    assert len(body["reasons"]) == 1
    assert reason in body["reasons"][0]


def test_missing_flags_count_as_false() -> None:
    ok, body = evaluate({}, CFG, HOUR_MS, False, now=NOW)
    assert not ok
    assert len(body["reasons"]) == 3
    assert body["snapshot"]["leader"] is False
    assert body["snapshot"]["age_seconds"] is None


def test_nats_down_then_back() -> None:
    status = healthy_status()
    assert evaluate(status, CFG, HOUR_MS, True, now=NOW)[0]
    status["nats_connected"] = False
    assert not evaluate(status, CFG, HOUR_MS, True, now=NOW)[0]
    status["nats_connected"] = True
    assert evaluate(status, CFG, HOUR_MS, True, now=NOW)[0]


def test_stale_snapshot() -> None:
    limit = 3 * 3600
    fresh = healthy_status(snapshot={"last_at": NOW - limit + 1})
    stale = healthy_status(snapshot={"last_at": NOW - limit - 1})
    assert evaluate(fresh, CFG, HOUR_MS, True, now=NOW)[0]
    ok, body = evaluate(stale, CFG, HOUR_MS, True, now=NOW)
    assert not ok
    assert "snapshot" in body["reasons"][0]
    assert body["snapshot"]["age_seconds"] == pytest.approx(limit + 1)


def test_stale_snapshot_respects_intervals_setting() -> None:
    cfg = HealthCheckConfig(max_snapshot_age_intervals=1.5)
    status = healthy_status(snapshot={"last_at": NOW - 2 * 3600})
    assert not evaluate(status, cfg, HOUR_MS, True, now=NOW)[0]
    assert evaluate(status, HealthCheckConfig(max_snapshot_age_intervals=0), HOUR_MS, True,
                    now=NOW)[0]


def test_stale_snapshot_ignored_when_snapshots_disabled_or_no_interval() -> None:
    stale = healthy_status(snapshot={"last_at": NOW - 10 * 3600})
    assert evaluate(stale, CFG, HOUR_MS, False, now=NOW)[0]
    assert evaluate(stale, CFG, 0, True, now=NOW)[0]


def test_old_snapshot_holding_every_change_is_fresh() -> None:
    """Idle is healthy: the age of a snapshot that lacks no change does not matter."""
    idle = healthy_status(snapshot={"last_at": NOW - 10 * 3600, "unsaved_change_at": None})
    ok, body = evaluate(idle, CFG, HOUR_MS, True, now=NOW)
    assert ok, body["reasons"]
    assert body["snapshot"]["age_seconds"] == pytest.approx(10 * 3600)
    assert body["snapshot"]["staleness_seconds"] == 0


def test_limit_counts_from_the_first_change_the_snapshot_lacks() -> None:
    limit = 3 * 3600
    recent = healthy_status(snapshot={"last_at": NOW - 10 * 3600,
                                      "unsaved_change_at": NOW - limit + 1})
    assert evaluate(recent, CFG, HOUR_MS, True, now=NOW)[0]
    old = healthy_status(snapshot={"last_at": NOW - 10 * 3600,
                                   "unsaved_change_at": NOW - limit - 1})
    ok, body = evaluate(old, CFG, HOUR_MS, True, now=NOW)
    assert not ok
    assert "lacks a change made" in body["reasons"][0]
    assert body["snapshot"]["staleness_seconds"] == pytest.approx(limit + 1)
    # Without freshness (a node that does not follow the streams' heads): the age rule.
    assert "staleness_seconds" not in evaluate(healthy_status(), CFG, HOUR_MS, True, now=NOW)[1][
        "snapshot"]


def test_nats_reason_is_the_nodes() -> None:
    status = healthy_status(nats_connected=False,
                            nats_error="NATS unreachable at nats://h:4222: connection refused")
    ok, body = evaluate(status, CFG, HOUR_MS, True, now=NOW)
    assert not ok
    assert body["reasons"] == ["NATS unreachable at nats://h:4222: connection refused"]


def test_no_snapshot_yet() -> None:
    young = healthy_status(uptime_seconds=3 * 3600 - 1, snapshot={"last_at": None})
    old = healthy_status(uptime_seconds=3 * 3600 + 1, snapshot={})
    assert evaluate(young, CFG, HOUR_MS, True, now=NOW)[0]
    ok, body = evaluate(old, CFG, HOUR_MS, True, now=NOW)
    assert not ok
    assert "no snapshot" in body["reasons"][0]
    assert body["snapshot"]["last_at"] is None


def test_snapshot_age_from_age_seconds_and_strings() -> None:
    by_age = healthy_status(snapshot={"age_seconds": 4 * 3600.0})
    assert not evaluate(by_age, CFG, HOUR_MS, True, now=NOW)[0]
    by_text = healthy_status(snapshot={"last_at": rfc3339(NOW - 30)})
    ok, body = evaluate(by_text, CFG, HOUR_MS, True, now=NOW)
    assert ok
    assert body["snapshot"]["age_seconds"] == pytest.approx(30, abs=0.01)
    future = healthy_status(snapshot={"last_at": NOW + 100})
    assert evaluate(future, CFG, HOUR_MS, True, now=NOW)[1]["snapshot"]["age_seconds"] == 0


def test_last_error_is_text() -> None:
    status = healthy_status(snapshot={"last_at": NOW, "last_error": "Upload failed: refused"})
    ok, body = evaluate(status, CFG, HOUR_MS, True, now=NOW)
    assert ok  # a failed attempt alone does not make the node unhealthy
    assert body["snapshot"]["last_error"] == "Upload failed: refused"


# --- database probe ----------------------------------------------------------------------------
async def test_probe_database(tmp_path: Path) -> None:
    db = tmp_path / "data.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x)")
    conn.close()
    assert await probe_database(db)
    assert not await probe_database(tmp_path / "missing.db")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database file" * 100)
    assert not await probe_database(junk)


# --- the endpoint over HTTP --------------------------------------------------------------------
@pytest.fixture
async def servers() -> AsyncIterator[list[HttpServer]]:
    started: list[HttpServer] = []
    yield started
    for server in started:
        await server.close()


async def serve(servers: list[HttpServer], status: Any, **kwargs: Any) -> HttpServer:
    cfg = kwargs.pop("cfg", CFG)
    server = await start_health_server(cfg, status, **kwargs)
    servers.append(server)
    return server


async def test_endpoint_follows_nats_state(servers: list[HttpServer]) -> None:
    state = healthy_status()
    server = await serve(servers, lambda: state)
    assert server.port > 0
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.get("/health")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json()["status"] == "healthy"
        state["nats_connected"] = False
        r = await client.get("/health")
        assert r.status_code == 503
        assert r.json()["nats_connected"] is False
        assert r.json()["status"] == "unhealthy"
        state["nats_connected"] = True
        assert (await client.get("/health")).status_code == 200


async def test_endpoint_stale_snapshot_and_missing_cdc(servers: list[HttpServer]) -> None:
    state = healthy_status(snapshot={"last_at": time.time() - 4 * 3600})
    server = await serve(servers, lambda: state, snapshot_interval_ms=HOUR_MS,
                         snapshot_enabled=True)
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.get("/health")
        assert r.status_code == 503
        assert r.json()["snapshot"]["age_seconds"] > 3 * 3600
        state["snapshot"] = {"last_at": time.time()}
        assert (await client.get("/health")).status_code == 200
        state["cdc_installed"] = False
        r = await client.get("/health")
        assert r.status_code == 503
        assert r.json()["cdc_installed"] is False


async def test_endpoint_short_text_without_detailed(servers: list[HttpServer]) -> None:
    state = healthy_status()
    cfg = HealthCheckConfig(enable=True, bind="127.0.0.1:0", detailed=False, path="/ready")
    server = await serve(servers, lambda: state, cfg=cfg)
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.get("/ready")
        assert (r.status_code, r.text) == (200, "healthy\n")
        assert r.headers["content-type"].startswith("text/plain")
        state["db_connected"] = False
        r = await client.get("/ready?verbose=1")
        assert r.status_code == 503
        assert r.text.startswith("unhealthy: database")
        assert (await client.get("/health")).status_code == 404


async def test_endpoint_async_status_and_failing_status(servers: list[HttpServer]) -> None:
    async def status() -> dict[str, Any]:
        await asyncio.sleep(0)
        return healthy_status()

    def broken() -> dict[str, Any]:
        raise RuntimeError("status unavailable")

    good = await serve(servers, status)
    bad = await serve(servers, broken)
    async with httpx.AsyncClient() as client:
        assert (await client.get(good.url + "/health")).status_code == 200
        r = await client.get(bad.url + "/health")
        assert r.status_code == 503
        assert r.json()["status"] == "unhealthy"


async def test_endpoint_methods(servers: list[HttpServer]) -> None:
    server = await serve(servers, healthy_status)
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.head("/health")
        assert r.status_code == 200
        assert r.content == b""
        assert int(r.headers["content-length"]) > 0
        r = await client.post("/health")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"


async def test_malformed_request_and_close(servers: list[HttpServer]) -> None:
    server = await serve(servers, healthy_status)
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"garbage\r\n\r\n")
    await writer.drain()
    reply = await reader.read()
    assert reply.startswith(b"HTTP/1.") and reply.split(b" ", 2)[1] == b"400"
    writer.close()
    await writer.wait_closed()
    # A client that connects and sends nothing does not hold up close().
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", server.port)
    await server.close()
    assert await idle_reader.read() == b""
    idle_writer.close()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(server.url + "/health")


async def test_several_servers_and_handler_error() -> None:
    async def boom() -> Response:
        raise ValueError("boom")

    async def fine() -> Response:
        return Response(200, b"fine")

    one = await HttpServer({"/x": boom}, "one").start("127.0.0.1:0")
    two = await HttpServer({"/x": fine}, "two").start("127.0.0.1:0")
    try:
        assert one.port != two.port
        async with httpx.AsyncClient() as client:
            assert (await client.get(one.url + "/x")).status_code == 500
            assert (await client.get(two.url + "/x")).text == "fine"
    finally:
        await one.close()
        await two.close()
        await one.close()  # closing twice is harmless


async def test_all_interfaces_bind() -> None:
    server = await HttpServer({"/x": lambda: _ok()}, "any").start(":0")
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{server.port}/x")
            assert r.status_code == 200
    finally:
        await server.close()


async def _ok() -> Response:
    return Response(200, b"ok")


async def _exchange(port: int, data: bytes, *, pause: float = 0.0) -> bytes:
    """Send ``data`` (in two halves ``pause`` seconds apart) and read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        half = len(data) // 2
        writer.write(data[:half])
        await writer.drain()
        if pause:
            await asyncio.sleep(pause)
        writer.write(data[half:])
        await writer.drain()
    except ConnectionError:
        pass
    try:
        return await asyncio.wait_for(reader.read(), 10)
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def test_huge_requests_are_refused(servers: list[HttpServer]) -> None:
    server = await serve(servers, healthy_status)
    long_line = b"GET /health?" + b"x" * 20_000 + b" HTTP/1.1\r\nHost: a\r\n\r\n"
    reply = await _exchange(server.port, long_line)
    assert reply.split(b" ", 2)[1] in (b"400", b"414", b"431"), reply[:200]
    many = b"GET /health HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n"
    reply = await _exchange(server.port, many)
    assert reply.split(b" ", 2)[1] in (b"400", b"431"), reply[:200]
    # A body where none is taken: refused, and not read for a next request.
    body = b"POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 50000000\r\n\r\n" + b"z" * 65536
    reply = await _exchange(server.port, body)
    assert reply.startswith(b"HTTP/1.1 405 "), reply[:200]


async def test_slow_requests_are_cut_off(servers: list[HttpServer],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harmonylite.ops.http_server.HEAD_TIMEOUT", 0.5)
    server = await serve(servers, healthy_status)
    started = time.monotonic()
    # Half a request head, the rest long after the deadline: the connection is gone by then.
    reply = await _exchange(server.port, b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n", pause=3)
    assert reply == b""
    assert time.monotonic() - started < 9
    async with httpx.AsyncClient(base_url=server.url) as client:
        assert (await client.get("/health")).status_code == 200  # others are served meanwhile


async def test_cluster_page_and_its_data(servers: list[HttpServer]) -> None:
    async def cluster() -> dict[str, Any]:
        return {"nodes": [{"node_id": 1, "state": "healthy"}], "leader": 1}

    cfg = CFG
    server = await start_health_server(cfg, healthy_status, cluster=cluster)
    servers.append(server)
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "cluster.json" in r.text and "data-node-id" in r.text
        r = await client.get("/cluster.json")
        assert r.json()["nodes"][0]["state"] == "healthy"
        assert (await client.get("/health")).status_code == 200
