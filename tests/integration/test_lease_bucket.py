"""The lease bucket survives one server: at least 3 replicas where the servers allow it, even
with ``replicas = 1`` (HarmonyLite's example configs); one replica on a single server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats

from cluster import Cluster
from harmonylite.bus.kv import open_bucket
from harmonylite.bus.names import LEGACY_LEASE_BUCKET as BUCKET
from servers import NatsServer


async def _replicas_after_open(url: str) -> int:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await open_bucket(js, BUCKET, 30_000, 10.0, replicas=1)
        info = await js.stream_info(f"KV_{BUCKET}")
        return int(info.config.num_replicas)
    finally:
        await nc.close()


def test_the_lease_bucket_has_three_replicas_on_a_cluster_even_with_replicas_1(
        tmp_path: Path) -> None:
    cluster = Cluster(tmp_path / "cluster").start()
    try:
        cluster.wait_ready()
        assert asyncio.run(_replicas_after_open(cluster.urls[0])) == 3
    finally:
        cluster.stop()


async def test_a_single_server_gets_one_replica(nats_server: NatsServer) -> None:
    assert await _replicas_after_open(nats_server.url) == 1
