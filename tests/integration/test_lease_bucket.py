"""The lease bucket survives one server: at least 3 replicas where the servers allow it, even
with ``replicas = 1`` (HarmonyLite's example configs); one replica on a single server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import nats
import pytest
from nats.js.api import KeyValueConfig

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("cluster")).start()
    try:
        yield c
    finally:
        c.stop()


def test_the_lease_bucket_has_three_replicas_on_a_cluster_even_with_replicas_1(
        cluster: Cluster) -> None:
    # Asked as soon as the servers answer: their peers may not all be current yet, and a
    # cluster still forming must not leave the lease on one server for good.
    cluster.wait_ready()
    assert asyncio.run(_replicas_after_open(cluster.urls[0])) == 3


async def _raised_after_open(url: str) -> tuple[int, int]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        await js.create_key_value(KeyValueConfig(bucket="early", replicas=1))
        before = (await js.stream_info("KV_early")).config.num_replicas
        await open_bucket(js, "early", 0, 10.0, replicas=1)
        after = (await js.stream_info("KV_early")).config.num_replicas
        return int(before or 1), int(after or 1)
    finally:
        await nc.close()


def test_a_bucket_created_with_one_replica_is_raised_when_opened_on_a_cluster(
        cluster: Cluster) -> None:
    cluster.wait_ready()
    assert asyncio.run(_raised_after_open(cluster.urls[1])) == (1, 3)


async def test_a_single_server_gets_one_replica(nats_server: NatsServer) -> None:
    assert await _replicas_after_open(nats_server.url) == 1
