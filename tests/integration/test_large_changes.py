"""Payload limits: a server with max_payload 256 KiB, big transactions and one change larger than
any message the server accepts. Real node processes, a real nats-server."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from harmonylite.replication import large_changes
from harmonylite.storage.nats_objects import NatsObjectStore
from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE files(id INTEGER PRIMARY KEY, name TEXT, body BLOB)"
MAX_PAYLOAD = 262144


@pytest.fixture
def small_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "nats-store", config=f"max_payload: {MAX_PAYLOAD}\n").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def two_nodes(tmp_path: Path, small_server: NatsServer) -> Iterator[list[NodeProc]]:
    nodes = []
    for i in (1, 2):
        node = NodeProc(tmp_path / f"node{i}", i, {"nats": {"urls": [small_server.url]}})
        node.execute(SCHEMA)
        nodes.append(node)
    for node in nodes:
        node.start()
    yield nodes
    for node in nodes:
        node.stop()


def rows(node: NodeProc) -> list[tuple[Any, ...]]:
    return node.query("SELECT id, name, body FROM files ORDER BY id")


def test_a_400kb_transaction_replicates_under_a_256k_server(two_nodes: list[NodeProc]) -> None:
    a, b = two_nodes
    # Random bytes: zstd cannot shrink them, so the batch really is 400 KB on the wire.
    written = [(i, f"f{i}", os.urandom(4000)) for i in range(1, 101)]
    conn = a.connect()
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO files VALUES (?, ?, ?)", written)
    conn.execute("COMMIT")
    conn.close()
    wait_until(lambda: rows(b) == written, 30,
               f"the 400 KB transaction on node 2; node 1's log:\n{a.log_text()[-2000:]}")
    assert "publish failed" not in a.log_text()


def test_one_change_over_the_limit_replicates_and_blocks_nothing(
    two_nodes: list[NodeProc],
) -> None:
    a, b = two_nodes
    blob = os.urandom(600 * 1024)
    a.execute("INSERT INTO files VALUES (1, 'big', ?)", (blob,))
    # Later small changes of the same node, each its own transaction.
    for i in range(2, 12):
        a.execute("INSERT INTO files VALUES (?, ?, x'00')", (i, f"small{i}"))
    expected = [(1, "big", blob)] + [(i, f"small{i}", b"\x00") for i in range(2, 12)]
    wait_until(lambda: rows(b) == expected, 30,
               f"the large change and the ones after it on node 2; node 1's log:\n"
               f"{a.log_text()[-2000:]}")
    # The other node writes too, and its change reaches the first one past the large change.
    b.execute("INSERT INTO files VALUES (100, 'from b', x'01')")
    wait_until(lambda: rows(a) == [*expected, (100, "from b", b"\x01")], 30,
               "node 2's change on node 1")
    assert "stored as object" in a.log_text()
    assert "publish failed" not in a.log_text()


async def test_a_reference_whose_object_is_missing_waits_until_it_can_be_fetched(
    nats_server: NatsServer, caplog: pytest.LogCaptureFixture,
) -> None:
    """A failed fetch is retried, never skipped: resolve returns once the object appears."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        payload = os.urandom(300_000)
        sha = hashlib.sha256(payload).hexdigest()
        ref = large_changes.Reference("hl-large-test", f"9-{sha}", sha, len(payload), "files",
                                      (1,))
        headers = {large_changes.REF_HEADER: "1"}
        with caplog.at_level(logging.ERROR, logger="harmonylite"):
            task = asyncio.create_task(large_changes.resolve(js, ref.encode(), headers))
            deadline = asyncio.get_running_loop().time() + 20
            while "cannot fetch the large change" not in caplog.text:
                assert asyncio.get_running_loop().time() < deadline, "no error logged"
                assert not task.done(), "resolve gave up"
                await asyncio.sleep(0.05)
            # The bucket and the object appear later (a slow writer, a restored bucket).
            store = await NatsObjectStore.open(js, "hl-large-test")
            await store.upload_bytes(ref.name, payload)
            assert await asyncio.wait_for(task, 30) == payload
        # An ordinary message passes through untouched.
        assert await large_changes.resolve(js, b"plain", None) == b"plain"
    finally:
        await nc.close()


async def test_a_download_asked_before_its_consumer_is_ready_waits_for_it(
    nats_server: NatsServer,
) -> None:
    """A pull answered 503 (no responders: the consumer not ready yet, as while a cluster
    re-forms) is asked again: the download completes instead of failing as 'changed'."""
    nc = await nats.connect(nats_server.url)
    js = nc.jetstream()
    try:
        store = await NatsObjectStore.open(js, "hl-late-consumer")
        payload = os.urandom(600_000)  # several chunks
        await store.upload_bytes("snap/data", payload)
        real_add = js.add_consumer
        created: list[float] = []

        async def late_add(*args: Any, **kwargs: Any) -> Any:
            # The consumer exists only a moment after the download starts pulling from it.
            async def later() -> None:
                await asyncio.sleep(1.0)
                await real_add(*args, **kwargs)
                created.append(asyncio.get_running_loop().time())
            asyncio.get_running_loop().create_task(later())

        js.add_consumer = late_add  # type: ignore[method-assign]
        started = asyncio.get_running_loop().time()
        try:
            assert await store.download_bytes("snap/data") == payload
        finally:
            js.add_consumer = real_add  # type: ignore[method-assign]
        assert created and created[0] - started >= 0.9  # it really waited for the consumer
    finally:
        await nc.close()
