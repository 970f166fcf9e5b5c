"""Settings every node of a cluster must share (shard count, compression, prefixes) are checked.

A node started with a value that differs from the cluster's refuses to start (exit 2) and names
the key, its value and the cluster's. Changing the shard count is done for the whole cluster
with ``harmonylite shared-settings apply`` while every node is stopped (refused while one runs);
the nodes then read the old streams up to the cut before anything newer, so no row is lost and
every node ends on the same version of each row.
"""

from __future__ import annotations

import asyncio
import json
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

    # The record changes under a running node (the count changed while it was cut off from
    # NATS): it says so on health, naming the key and both values, and holds its changes until
    # the record matches.
    asyncio.run(_put_settings(nats_server.url, {"replication_log.shards": 2}))

    def first_says(code: int, text: str) -> bool:
        got, body = health(first)
        return got == code and any(text in r for r in body.get("reasons", [])) == bool(text)

    wait_until(lambda: first_says(503, "replication_log.shards = 1 on this node, the "
                                       "cluster's is 2"), 20, "503 naming the shard count")
    # Meanwhile it publishes nothing (it would publish where the others do not read).
    first.execute("INSERT INTO items VALUES (2, 'y')")
    wait_until(lambda: "publishing held" in first.log_text(), 10, "publishing held")
    assert pending(first) == 1
    asyncio.run(_put_settings(nats_server.url, {"replication_log.shards": 1}))
    wait_until(lambda: first_says(200, ""), 20, "200 once the record matches again")
    wait_until(lambda: pending(first) == 0, 20, "the held change published")


def pending(node: NodeProc) -> int:
    return int(node.query(
        "SELECT count(*) FROM __harmonylite__log WHERE id > "
        "(SELECT v FROM __harmonylite__state WHERE k = 'published')")[0][0])


async def _put_settings(url: str, settings: dict[str, object]) -> None:
    nc = await nats.connect(url)
    try:
        kv = await nc.jetstream().key_value("harmonylite-cluster-settings")
        await kv.put("settings", json.dumps({"settings": settings, "node_id": 9}).encode())
    finally:
        await nc.close()


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


def write(node: NodeProc, ids_: range) -> None:
    for i in ids_:
        node.execute("INSERT INTO items VALUES (?, ?)", (i, f"row {i}"))


def update(node: NodeProc, tag: str, rows_: range = range(1, 41)) -> None:
    for i in rows_:
        node.execute("UPDATE items SET name = ? WHERE id = ?", (f"{tag} {i}", i))


def rows(node: NodeProc) -> list[tuple[Any, ...]]:
    return node.query("SELECT id, name FROM items ORDER BY id")


def refused_while_running(node: NodeProc, running: NodeProc) -> None:
    """``shared-settings apply`` of a new shard count while ``running`` runs: exit 2, naming the
    key, the running node and the procedure."""
    out = node.cli("shared-settings", "apply")
    text = out.stdout + out.stderr
    assert out.returncode == 2, text
    assert "replication_log.shards" in text and f"node {running.node_id}" in text, text
    assert "Stop every node" in text and "Changing the shard count" in text, text
    assert health(running)[0] == 200  # nothing was recorded


def test_lowering_shards_is_done_with_the_cluster_stopped_and_loses_no_row(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = make_node(tmp_path, 1, nats_server.url, shards=4)
    b = make_node(tmp_path, 2, nats_server.url, shards=4)
    a.start_async()
    b.start()
    a.wait_started()
    write(a, range(1, 41))
    write(b, range(41, 81))
    wait_until(lambda: ids(a) == ids(b) == set(range(1, 81)), 30, "both nodes at 80 rows")

    # One node at a time: a node on the new count is refused at start, and so is the change.
    assert a.stop() == 0
    write(b, range(81, 121))  # on b's four shards while a is down: a reads them later
    set_replication_log(a, shards=1)
    code, text = run_to_exit(a)
    assert code == 2, text
    assert "replication_log.shards = 1 on this node, the cluster's is 4" in text, text
    refused_while_running(a, b)

    # With every node stopped, the change is recorded; the nodes start on the new count.
    assert b.stop() == 0
    out = a.cli("shared-settings", "apply")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "replication_log.shards: 4 -> 1" in out.stdout, out.stdout
    set_replication_log(b, shards=1)
    a.start_async()
    b.start()
    a.wait_started()
    update(a, "a")
    update(b, "b", range(81, 121))
    wait_until(lambda: ids(a) == ids(b) == set(range(1, 121)) and rows(a) == rows(b), 45,
               f"both nodes at 120 equal rows (a {len(ids(a))}, b {len(ids(b))})")
    for node in (a, b):
        wait_until(lambda n=node: health(n)[0] == 200, 20, f"node {node.node_id} healthy")
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
    a.stop()
    b.stop()
    # The retired streams are still there (the operator removes them once every node read
    # them); nothing else was created.
    assert [s for s in asyncio.run(_stream_names(nats_server.url)) if not s.startswith("KV_")] \
        == [f"harmonylite-changes-c-{n}" for n in range(1, 5)]


def test_raising_shards_applies_each_rows_old_changes_first_on_every_node(
        tmp_path: Path, nats_server: NatsServer) -> None:
    a = make_node(tmp_path, 1, nats_server.url, shards=1)
    b = make_node(tmp_path, 2, nats_server.url, shards=1)
    a.start_async()
    b.start()
    a.wait_started()
    write(a, range(1, 41))
    wait_until(lambda: ids(b) == set(range(1, 41)), 30, "b at 40 rows")

    # One node at a time is refused: under two counts at once a row's changes travel on two
    # streams, and the nodes would end on different versions.
    assert a.stop() == 0
    set_replication_log(a, shards=4)
    refused_while_running(a, b)

    # b stops behind: a's last changes on the old shard are not applied there yet.
    assert b.stop() == 0
    set_replication_log(a, shards=1)
    a.start()
    for n in range(3):
        update(a, f"old {n}")
    assert a.stop() == 0
    set_replication_log(a, shards=4)
    out = a.cli("shared-settings", "apply")
    assert out.returncode == 0, out.stdout + out.stderr

    # The rows change again on the new shards before b starts: b applies the old stream up to
    # the cut before anything newer, so it ends on the new versions as a does.
    a.start()
    update(a, "new")
    set_replication_log(b, shards=4)
    b.start()
    want = [(i, f"new {i}") for i in range(1, 41)]
    wait_until(lambda: rows(a) == rows(b) == want, 30,
               f"both nodes on the new versions (b has {rows(b)[:3]}...)")
    assert "the shard count changed" in b.log_text(), b.log_text()[-5000:]
    for node in (a, b):
        wait_until(lambda n=node: health(n)[0] == 200, 20, f"node {node.node_id} healthy")
        assert "Traceback" not in node.log_text(), node.log_text()[-3000:]
    a.stop()
    b.stop()
