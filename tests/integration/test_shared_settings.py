"""Settings every node of a cluster must share (shard count, compression, prefixes) are checked.

A node started with a value that differs from the cluster's refuses to start (exit 2) and names
the key, its value and the cluster's. Changing the shard count is done for the whole cluster
with ``harmonylite shared-settings apply``: nodes still running the old value say so on health
(503), and nodes running the new one read the retired streams, so no row is lost on the way.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import nats

from nodes import NodeProc, wait_until, write_toml
from servers import NatsServer, free_port

SCHEMA = "CREATE TABLE items(id INTEGER PRIMARY KEY, name TEXT)"


def make_node(tmp_path: Path, node_id: int, url: str, **replication_log: Any) -> NodeProc:
    port = free_port()
    node = NodeProc(tmp_path / f"node{node_id}", node_id, {
        "nats": {"urls": [url], "reconnect_wait_seconds": 1},
        "replication_log": replication_log,
        "health_check": {"enable": True, "bind": f"127.0.0.1:{port}"},
    })
    node.health_port = port  # type: ignore[attr-defined]
    node.execute(SCHEMA)
    return node


def set_replication_log(node: NodeProc, **values: Any) -> None:
    import tomllib

    cfg = tomllib.loads(node.config_path.read_text())
    cfg["replication_log"] = {**cfg.get("replication_log", {}), **values}
    write_toml(node.config_path, cfg)


def health(node: NodeProc) -> tuple[int, dict[str, Any]]:
    try:
        r = httpx.get(f"http://127.0.0.1:{node.health_port}/health",  # type: ignore[attr-defined]
                      timeout=5)
    except httpx.HTTPError:
        return 0, {}
    return r.status_code, r.json()


def run_to_exit(node: NodeProc, timeout: float = 60) -> tuple[int, str]:
    before = len(node.log_text()) if node.log_path.exists() else 0
    node.start_async()
    assert node.proc is not None
    code = node.proc.wait(timeout)
    node.proc = None
    return code, node.log_text()[before:]


def ids(node: NodeProc) -> set[int]:
    return {int(r[0]) for r in node.query("SELECT id FROM items")}


def test_compress_differing_from_the_cluster_is_refused_naming_the_key(
        tmp_path: Path, nats_server: NatsServer) -> None:
    first = make_node(tmp_path, 1, nats_server.url).start()
    second = make_node(tmp_path, 2, nats_server.url, compress=False)
    code, text = run_to_exit(second)
    assert code == 2, text
    assert "replication_log.compress" in text, text
    assert "false" in text and "true" in text, text
    assert "subjects overlap" not in text, text
    # The first node is untouched.
    assert health(first)[0] == 200
    first.execute("INSERT INTO items VALUES (1, 'x')")
    wait_until(lambda: first.query("SELECT count(*) FROM __harmonylite__seq") != [(0,)], 10,
               "the first node to keep replicating")

    # A cluster an older version made has streams and no record: the streams tell.
    asyncio.run(_delete_bucket(nats_server.url, "harmonylite-cluster-settings"))
    code, text = run_to_exit(second)
    assert code == 2, text
    assert "replication_log.compress = false on this node, the cluster's is true" in text, text
    assert "found in the existing streams" in text, text


async def _delete_bucket(url: str, bucket: str) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_key_value(bucket)
    finally:
        await nc.close()


async def _stream_names(url: str) -> list[str]:
    nc = await nats.connect(url)
    try:
        return sorted(str(s.config.name) for s in await nc.jetstream().streams_info())
    finally:
        await nc.close()


def test_changing_shards_one_node_at_a_time_loses_no_row(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = make_node(tmp_path, 1, nats_server.url, shards=4)
    b = make_node(tmp_path, 2, nats_server.url, shards=4)
    a.start_async()
    b.start()
    a.wait_started()
    next_id = iter(range(1, 10_000))

    def write(node: NodeProc, count: int) -> None:
        for _ in range(count):
            i = next(next_id)
            node.execute("INSERT INTO items VALUES (?, ?)", (i, f"row {i}"))

    write(a, 60)
    write(b, 60)
    wait_until(lambda: ids(a) == ids(b) == set(range(1, 121)), 30, "both nodes at 120 rows")

    # Rolling restart, first node: its new shard count differs from the cluster's.
    assert a.stop() == 0
    write(b, 50)  # rows b publishes on its four shards while a is down
    set_replication_log(a, shards=1)
    code, text = run_to_exit(a)
    assert code == 2, text
    assert "replication_log.shards" in text and "1" in text and "4" in text, text

    # The change, for the whole cluster.
    out = a.cli("shared-settings", "apply")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replication_log.shards" in out.stdout

    # b still runs with 4 shards: it says so on health, naming the key and both values.
    def b_says_so() -> bool:
        code, body = health(b)
        return code == 503 and any("replication_log.shards" in r for r in body.get("reasons", []))

    wait_until(b_says_so, 20, "b to report the difference on health")

    # a runs with one shard now, while b (four shards) keeps writing.
    writing = threading.Thread(target=write, args=(b, 100))
    writing.start()
    a.start()
    write(a, 50)
    writing.join()
    assert b.stop() == 0
    set_replication_log(b, shards=1)
    b.start()
    write(b, 20)
    total = set(range(1, next(next_id)))
    wait_until(lambda: ids(a) == ids(b) == total, 45,
               f"both nodes at {len(total)} rows (a {len(ids(a))}, b {len(ids(b))})")
    for node in (a, b):
        wait_until(lambda n=node: health(n)[0] == 200, 20, f"node {node.node_id} healthy")
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
    a.stop()
    b.stop()
    # The retired streams are still there (the operator removes them once every node runs the
    # new value); nothing else was created.
    assert asyncio.run(_stream_names(nats_server.url)) == [
        "KV_harmonylite-cluster-settings", "KV_harmonylite-schema-registry",
        *(f"harmonylite-changes-c-{n}" for n in range(1, 5))]
