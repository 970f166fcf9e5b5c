"""Node metrics: names, values, private registries, and /metrics over real loopback HTTP."""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harmonylite.config import PrometheusConfig
from harmonylite.errors import ConfigError
from harmonylite.ops.metrics import Metrics, start_metrics_server

CONTRACT_NAMES = ("snapshot_age_seconds", "snapshot_duration_seconds", "snapshot_bytes",
                  "snapshot_failures_total", "snapshot_leader", "published_total",
                  "replicated_total", "pending_publish")
OPERATOR_NAMES = ("replication_lag_seconds", "apply_failures_total", "leadership_changes_total",
                  "upload_bytes_per_second", "restores_total", "nats_connected")


class FakeClock:
    def __init__(self, now: float = 1_750_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def samples(text: str) -> dict[str, float]:
    """Sample name (with labels folded in for histograms' le) to value."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name
            if "le" in s.labels:
                key += f"{{le={s.labels['le']}}}"
            out[key] = s.value
    return out


def values(m: Metrics) -> dict[str, float]:
    return samples(m.render().decode())


def test_every_name_is_exported_with_prefix() -> None:
    got = values(Metrics())
    for name in CONTRACT_NAMES + OPERATOR_NAMES:
        if name == "snapshot_duration_seconds":
            assert "harmonylite_snapshot_duration_seconds_count" in got
            assert "harmonylite_snapshot_duration_seconds_bucket{le=+Inf}" in got
        else:
            assert f"harmonylite_{name}" in got, name
    sub = values(Metrics("acme", "db1"))
    assert "acme_db1_published_total" in sub
    assert "acme_db1_nats_connected" in sub
    assert not any(k.startswith("harmonylite_") for k in sub)


def test_histogram_type_and_help_lines() -> None:
    text = Metrics().render().decode()
    assert "# TYPE harmonylite_snapshot_duration_seconds histogram" in text
    assert "# TYPE harmonylite_published_total counter" in text
    assert "# HELP harmonylite_snapshot_age_seconds " in text


def test_from_config_and_bad_names() -> None:
    m = Metrics.from_config(PrometheusConfig(namespace="hl", subsystem="x"), node_id=9)
    got = m.render().decode()
    assert 'hl_x_build_info{node_id="9"' in got
    with pytest.raises(ConfigError) as err:
        Metrics("bad-name")
    assert err.value.key == "prometheus.namespace"
    with pytest.raises(ConfigError) as err:
        Metrics(subsystem="9lives")
    assert err.value.key == "prometheus.subsystem"


def test_private_registries_do_not_collide() -> None:
    a, b = Metrics(), Metrics()
    a.published(5)
    b.published(1)
    assert values(a)["harmonylite_published_total"] == 5
    assert values(b)["harmonylite_published_total"] == 1


def test_replication_counters_and_lag() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    m.published(3)
    m.published(0)
    m.replicated(4, published_at=clock.now - 2.5)
    m.replicated(2)  # without a publish time the lag stays as measured
    m.apply_failed(2)
    m.set_pending(17)
    got = values(m)
    assert got["harmonylite_published_total"] == 3
    assert got["harmonylite_replicated_total"] == 6
    assert got["harmonylite_apply_failures_total"] == 2
    assert got["harmonylite_pending_publish"] == 17
    assert got["harmonylite_replication_lag_seconds"] == pytest.approx(2.5)
    m.replicated(1, published_at=clock.now + 1)  # clock skew never gives a negative lag
    m.set_pending(0)
    got = values(m)
    assert got["harmonylite_replication_lag_seconds"] == 0
    assert got["harmonylite_pending_publish"] == 0


def test_snapshot_saved_and_age() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    assert math.isnan(values(m)["harmonylite_snapshot_age_seconds"])
    assert m.snapshot_state() == {"leader": False, "last_id": None, "last_at": None,
                                  "age_seconds": None, "last_error": None}
    m.snapshot_saved(12.0, 4096, clock.now, snapshot_id="s1", upload_seconds=2.0)
    clock.now += 90
    got = values(m)
    assert got["harmonylite_snapshot_age_seconds"] == pytest.approx(90)
    assert got["harmonylite_snapshot_last_timestamp_seconds"] == pytest.approx(clock.now - 90)
    assert got["harmonylite_snapshot_bytes"] == 4096
    assert got["harmonylite_upload_bytes_per_second"] == 2048
    assert got["harmonylite_snapshot_duration_seconds_count"] == 1
    assert got["harmonylite_snapshot_duration_seconds_sum"] == 12
    assert got["harmonylite_snapshot_duration_seconds_bucket{le=10.0}"] == 0
    assert got["harmonylite_snapshot_duration_seconds_bucket{le=30.0}"] == 1
    state = m.snapshot_state()
    assert state["last_id"] == "s1"
    assert state["age_seconds"] == pytest.approx(90)


def test_snapshot_seen_keeps_newest() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    m.snapshot_seen("new", "2025-06-15T12:00:00Z")
    m.snapshot_seen("old", "2025-06-01T12:00:00Z")
    m.snapshot_seen("none", None)
    assert m.snapshot_state()["last_id"] == "new"
    m.restored("newer", "2025-06-16T00:00:00Z")
    assert m.snapshot_state()["last_id"] == "newer"
    assert values(m)["harmonylite_restores_total"] == 1
    m.restored()
    assert values(m)["harmonylite_restores_total"] == 2


def test_snapshot_failures_redact_and_clear() -> None:
    m = Metrics()
    m.snapshot_failed(RuntimeError("Upload failed: sftp://backup:hunter2@host/x refused"))
    m.snapshot_failed()
    assert values(m)["harmonylite_snapshot_failures_total"] == 2
    error = m.snapshot_state()["last_error"]
    assert "hunter2" not in error
    assert error.startswith("Upload failed")
    m.snapshot_failed(TimeoutError())
    assert m.snapshot_state()["last_error"] == "TimeoutError"
    m.snapshot_saved(1.0, 10)
    assert m.snapshot_state()["last_error"] is None


def test_leadership() -> None:
    m = Metrics()
    m.leader_changed(False)  # the initial state is not a change
    assert values(m)["harmonylite_leadership_changes_total"] == 0
    m.leader_changed(True)
    m.leader_changed(True)
    got = values(m)
    assert got["harmonylite_snapshot_leader"] == 1
    assert got["harmonylite_leadership_changes_total"] == 1
    assert m.snapshot_state()["leader"] is True
    m.leader_changed(False)
    got = values(m)
    assert got["harmonylite_snapshot_leader"] == 0
    assert got["harmonylite_leadership_changes_total"] == 2


def test_upload_rate_ignores_zero_duration() -> None:
    m = Metrics()
    m.uploaded(1000, 0.5)
    m.uploaded(1000, 0)
    assert values(m)["harmonylite_upload_bytes_per_second"] == 2000


def test_nats_connected_set_and_tracked() -> None:
    m = Metrics()
    assert values(m)["harmonylite_nats_connected"] == 0
    m.set_nats_connected(True)
    assert values(m)["harmonylite_nats_connected"] == 1
    state = {"up": False}
    m.track_nats_connected(lambda: state["up"])
    assert values(m)["harmonylite_nats_connected"] == 0
    state["up"] = True
    assert values(m)["harmonylite_nats_connected"] == 1

    def broken() -> bool:
        raise RuntimeError("no connection object")

    m.track_nats_connected(broken)
    assert values(m)["harmonylite_nats_connected"] == 0


def test_tracked_snapshot_age() -> None:
    m = Metrics()
    age: dict[str, float | None] = {"v": 42.0}
    m.track_snapshot_age(lambda: age["v"])
    assert values(m)["harmonylite_snapshot_age_seconds"] == 42
    assert m.snapshot_state()["age_seconds"] == 42
    age["v"] = None
    assert math.isnan(values(m)["harmonylite_snapshot_age_seconds"])

    def broken() -> float | None:
        raise RuntimeError("store unreachable")

    m.track_snapshot_age(broken)
    assert math.isnan(values(m)["harmonylite_snapshot_age_seconds"])


def test_snapshot_staleness() -> None:
    clock = FakeClock()
    m = Metrics(clock=clock)
    assert "unsaved_change_at" not in m.snapshot_state()  # not tracked: health uses the age
    state: dict[str, tuple[bool, float | None]] = {"v": (False, None)}
    m.track_snapshot_freshness(lambda: state["v"])
    assert math.isnan(values(m)["harmonylite_snapshot_staleness_seconds"])  # none known yet
    assert "unsaved_change_at" not in m.snapshot_state()
    state["v"] = (True, None)  # the newest snapshot holds every change
    assert values(m)["harmonylite_snapshot_staleness_seconds"] == 0
    assert m.snapshot_state()["unsaved_change_at"] is None
    state["v"] = (True, clock.now - 90)
    assert values(m)["harmonylite_snapshot_staleness_seconds"] == 90
    assert m.snapshot_state()["unsaved_change_at"] == clock.now - 90


async def test_metrics_endpoint_for_two_nodes() -> None:
    cfg = PrometheusConfig(enable=True, bind="127.0.0.1:0")
    first, second = Metrics(node_id=1), Metrics(node_id=2)
    s1 = await start_metrics_server(cfg, first)
    s2 = await start_metrics_server(cfg, second)
    try:
        first.published(7)
        second.leader_changed(True)
        async with httpx.AsyncClient() as client:
            r1 = await client.get(s1.url + "/metrics")
            r2 = await client.get(s2.url + "/metrics")
            assert r1.status_code == r2.status_code == 200
            assert r1.headers["content-type"].startswith("text/plain")
            v1, v2 = samples(r1.text), samples(r2.text)
            assert v1["harmonylite_published_total"] == 7
            assert v2["harmonylite_published_total"] == 0
            assert v1["harmonylite_snapshot_leader"] == 0
            assert v2["harmonylite_snapshot_leader"] == 1
            assert (await client.get(s1.url + "/")).status_code == 404
    finally:
        await s1.close()
        await s2.close()


async def test_metrics_bind_is_checked() -> None:
    with pytest.raises(ConfigError) as err:
        await start_metrics_server(PrometheusConfig(bind="nonsense"), Metrics())
    assert err.value.key == "prometheus.bind"
