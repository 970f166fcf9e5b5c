"""The cluster view from heartbeat records (pure): states, worst first, a down node's lag against
the live nodes' heads, the leader, schema differences; and the lag history."""

from __future__ import annotations

from typing import Any

from harmonylite.bus.names import node_of
from harmonylite.cluster.heartbeat import LagHistory
from harmonylite.cluster.view import build, format_table

NOW = 1_750_000_000.0


def record(node: int, *, at: float = NOW - 0.5, applied: int = 100, head: int = 100,
           **extra: Any) -> dict[str, Any]:
    r: dict[str, Any] = {
        "node_id": node, "at": at, "healthy": True, "reasons": [], "host": f"h{node}",
        "streams": {"s-1": {"applied_sequence": applied, "stream_last_sequence": head,
                            "lag_messages": head - applied}},
        "lag_messages": head - applied, "lag_seconds": 0.0, "schema": {"t": "aaa"},
        "lease": {"holder": 1, "term": 1, "leader": node == 1}, "uptime_seconds": 60,
        "lag_history": [[NOW - 20, 0], [NOW - 10, 3]],
    }
    r.update(extra)
    return r


def test_all_healthy() -> None:
    doc = build([record(2), record(1), record(3)], now=NOW)
    assert [(n["node_id"], n["state"]) for n in doc["nodes"]] == [
        (1, "healthy"), (2, "healthy"), (3, "healthy")]
    assert doc["healthy"] and doc["leader"] == 1
    assert [n["leader"] for n in doc["nodes"]] == [True, False, False]
    assert doc["nodes"][0]["lag_history"][-1] == [NOW, 0]


def test_down_unhealthy_and_worst_first() -> None:
    records = [
        record(1, head=500, applied=500),
        record(2, reasons=["apply stalled on s-1: locked"], healthy=False),
        record(3, at=NOW - 30, applied=100, snapshot={"age_seconds": 5.0}),  # the head moved
        record(4, applied=10, head=2000),  # far behind
        record(5, schema={"t": "bbb"}),  # another schema than most
    ]
    doc = build(records, now=NOW, max_lag=1000)
    states = {n["node_id"]: n["state"] for n in doc["nodes"]}
    assert states == {1: "healthy", 2: "unhealthy", 3: "down", 4: "unhealthy", 5: "unhealthy"}
    assert doc["nodes"][0]["node_id"] == 3 and not doc["healthy"]
    down = doc["nodes"][0]
    assert down["lag_messages"] == 1900  # behind the highest head any node reports
    assert down["reasons"] == ["no heartbeat for 30 s"] and down["last_seen_seconds"] == 30.0
    assert down["uptime_seconds"] is None
    assert down["snapshot"]["age_seconds"] == 35.0  # as of now, not of its last beat
    by_id = {n["node_id"]: n for n in doc["nodes"]}
    assert "1990 messages behind (limit 1000)" in by_id[4]["reasons"]
    assert by_id[5]["schema_differs"] == ["t"]
    text = format_table(doc)
    assert text.splitlines()[1].startswith("3 ") and "seen 30 s ago" in text


def test_newest_record_wins_and_a_clean_stop_is_down() -> None:
    doc = build([record(1, at=NOW - 100), record(1, stopped=True), record(2)], now=NOW)
    one = next(n for n in doc["nodes"] if n["node_id"] == 1)
    assert one["state"] == "down" and one["reasons"][0].startswith("stopped")
    assert doc["leader"] is None or doc["leader"] == 1  # node 2 still reports 1 as holder


def test_a_schema_not_read_yet_is_no_difference() -> None:
    doc = build([record(1), record(2), record(3, schema={})], now=NOW)
    assert [n["state"] for n in doc["nodes"]] == ["healthy"] * 3


def test_no_records_is_not_healthy() -> None:
    doc = build([], now=NOW)
    assert doc["nodes"] == [] and not doc["healthy"]
    assert "no node" in format_table(doc)


def test_lag_history_keeps_the_peak_of_each_step() -> None:
    h = LagHistory(step=10, points=3)
    for t, lag in [(0, 1), (5, 9), (9, 2), (12, 0), (25, 4), (35, 1), (41, 0)]:
        h.add(t, lag)
    assert h.as_list() == [[20, 4], [30, 1], [40, 0]]
    assert node_of("node-12") == 12 and node_of("other") is None and node_of("node-x") is None
