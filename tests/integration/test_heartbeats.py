"""The heartbeat publisher on a real nats-server: a beat a second in the heartbeat bucket, the
last-seen bucket kept too, a final record at a clean stop, and a NATS that is gone or does not
answer never holds it up or stops it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import nats

from harmonylite.cluster import view
from harmonylite.cluster.heartbeat import Buckets, HeartbeatPublisher
from harmonylite.cluster.read import read_bucket, read_records
from servers import NatsServer

BUCKETS = Buckets("hb-test-heartbeats", "hb-test-last-seen")


async def collect() -> dict[str, Any]:
    return {"node_id": 7, "healthy": True, "reasons": [], "lag_messages": 3, "streams": {}}


async def test_beats_last_seen_and_a_clean_stop(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        pub = HeartbeatPublisher(js, 7, BUCKETS, collect, lambda: nc.is_connected,
                                 interval=0.2)
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        for _ in range(400):  # 20 s at most
            if pub.beats >= 5:
                break
            await asyncio.sleep(0.05)
        assert pub.beats >= 5 and pub.last_error is None
        [beat] = await read_bucket(js, BUCKETS.heartbeats)
        assert beat["node_id"] == 7 and beat["stopped"] is False
        assert beat["lag_history"][-1][1] == 3 and time.time() - beat["at"] < 5
        assert (await read_bucket(js, BUCKETS.last_seen))[0]["node_id"] == 7
        doc = view.build(await read_records(js, BUCKETS.heartbeats, BUCKETS.last_seen))
        assert [n["state"] for n in doc["nodes"]] == ["healthy"]
        stop.set()
        await asyncio.wait_for(task, 10)
        # Stopped cleanly: both buckets say so, and the view shows it down at once.
        for bucket in (BUCKETS.heartbeats, BUCKETS.last_seen):
            assert (await read_bucket(js, bucket))[0]["stopped"] is True
        doc = view.build(await read_records(js, BUCKETS.heartbeats, BUCKETS.last_seen))
        assert doc["nodes"][0]["state"] == "down"
    finally:
        await nc.close()


async def test_nats_gone_or_silent_never_holds_it_up(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2)
    try:
        js = nc.jetstream()
        connected = {"up": True}
        pub = HeartbeatPublisher(js, 8, BUCKETS, collect, lambda: connected["up"], interval=0.2)
        await pub.beat()
        assert pub.beats == 1
        nats_server.stop()
        # Told it is connected while the server is gone: each beat fails within its bound,
        # is logged once, and the loop goes on.
        started = time.monotonic()
        await pub.beat()
        await pub.beat()
        assert time.monotonic() - started < 10
        assert pub.beats == 1 and pub.last_error is not None
        # Told it is disconnected: nothing is attempted, the loop keeps its pace and stops.
        connected["up"] = False
        stop = asyncio.Event()
        task = asyncio.create_task(pub.run(stop))
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(task, 2)
        nats_server.start()
        connected["up"] = True
        deadline = time.monotonic() + 30
        while pub.beats < 2 and time.monotonic() < deadline:
            await pub.beat()
            await asyncio.sleep(0.2)
        assert pub.beats >= 2 and pub.last_error is None  # back by itself
    finally:
        await nc.close()
