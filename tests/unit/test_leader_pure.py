"""Pure parts of the snapshot lease and scheduler: periods, timeouts, backoff, triggers."""

from __future__ import annotations

import asyncio
import json
import time

from harmonylite.bus.kv import (
    backoff_seconds,
    heartbeat_seconds,
    lease_value,
    op_timeout_seconds,
    parse_value,
)
from harmonylite.snapshot.listing import listing_backoff
from harmonylite.snapshot.triggers import (
    check_period,
    count_threshold,
    snapshot_age,
    streams_past,
)


def test_heartbeat_is_a_third_of_the_ttl_and_at_least_a_second() -> None:
    assert heartbeat_seconds(30_000) == 10.0
    assert heartbeat_seconds(60_000) == 20.0
    assert heartbeat_seconds(3_000) == 1.0
    assert heartbeat_seconds(1_500) == 1.0


def test_kv_calls_are_bounded_well_under_a_heartbeat() -> None:
    for ttl in (3_000, 9_000, 30_000, 600_000):
        hb = heartbeat_seconds(ttl)
        assert op_timeout_seconds(hb) <= hb / 2
    assert op_timeout_seconds(heartbeat_seconds(3_000)) == 0.5
    assert op_timeout_seconds(heartbeat_seconds(600_000)) == 5.0


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_seconds(1.0, n) for n in range(6)] == [1, 2, 4, 8, 10, 10]
    assert backoff_seconds(20.0, 3) == 20.0  # never shorter than a heartbeat, never longer


def test_lease_value_names_the_node() -> None:
    raw = lease_value(7, "abc")
    data = parse_value(raw)
    assert data["node_id"] == 7 and data["token"] == "abc"
    assert abs(data["since"] - time.time()) < 5
    assert parse_value(b"not json") == {} and parse_value(None) == {}
    assert parse_value(json.dumps([1]).encode()) == {}


def test_message_count_threshold_per_stream() -> None:
    # Half of what every stream keeps, whatever the number of shards.
    assert count_threshold(1024, 1) == 512
    assert count_threshold(1024, 4) == 512
    assert count_threshold(60, 1) == 30
    assert count_threshold(1, 8) == 1


def test_streams_past_compares_with_the_snapshot_sequences() -> None:
    last = {"s-1": 300, "s-2": 120, "s-3": 10}
    base = {"s-1": 100, "s-2": 100}
    assert streams_past(last, base, 100) == ["s-1"]
    assert streams_past(last, base, 10) == ["s-1", "s-2", "s-3"]  # s-3 unknown: from 0
    assert streams_past(last, {"s-1": 300, "s-2": 120, "s-3": 10}, 1) == []


def test_snapshot_age_and_check_period() -> None:
    now = 1_700_000_000.0
    assert snapshot_age("2023-11-14T22:13:10.000000Z", now) == 10.0
    assert snapshot_age("garbage", now) == 0.0
    assert snapshot_age("2099-01-01T00:00:00Z", now) == 0.0
    assert check_period(1.0) == 1.0 and check_period(10.0) == 1.0 and check_period(0.2) == 0.5


def test_listing_waits_double_from_two_check_periods_up_to_32_or_30_seconds() -> None:
    async def waits(check_every: float) -> list[float]:
        backoff = listing_backoff(check_every)
        answered = asyncio.Event()
        answered.set()  # each wait returns at once: only the delays are looked at
        out = []
        for _ in range(7):
            out.append(backoff.delay)
            await backoff.wait(answered)
        backoff.reset()
        out.append(backoff.delay)
        return out

    assert asyncio.run(waits(1.0)) == [2, 4, 8, 16, 30, 30, 30, 2]
    assert asyncio.run(waits(0.5)) == [1, 2, 4, 8, 16, 16, 16, 1]
