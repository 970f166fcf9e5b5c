"""harmonylite as a drop-in for HarmonyLite: its flags, its server_config, its node ids, its
database layout and the messages an operator meets (real processes throughout)."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import cbor2
import nats

from nodes import NodeProc, wait_until
from servers import NatsServer, free_port

U64_MAX = 2**64 - 1


async def _publish(url: str, subject: str, data: bytes) -> None:
    nc = await nats.connect(url)
    try:
        await nc.jetstream().publish(subject, data)
    finally:
        await nc.close()


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_config_is_laid_over_the_cluster_flags(tmp_path: Path) -> None:
    client_port, monitor = free_port(), free_port()
    conf = tmp_path / "nats-server.conf"
    conf.write_text(f"monitor_port = {monitor}\njetstream {{\n  max_memory_store = 50M\n"
                    f"  store_dir = \"{tmp_path / 'js-from-file'}\"\n}}\n"
                    "# a conflicting setting: the file wins, as in HarmonyLite\n"
                    "max_payload = 2MB\n")
    # (The cluster flags over HarmonyLite's own files: tests/integration/test_harmonylite_e2e.py)
    node = NodeProc(tmp_path / "n1", 1, {"nats": {"server_config": str(conf),
                                                  "bind_address": f"127.0.0.1:{client_port}"}})
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    node.start()
    assert _listening(client_port) and _listening(monitor)
    text = node.log_text()
    assert f"JetStream store {tmp_path / 'js-from-file'}" in text
    assert "sets max_payload = 2MB, overriding 8388608" in text
    node.execute("INSERT INTO t VALUES (1)")
    wait_until(lambda: node.query("SELECT count(*) FROM __harmonylite__seq") == [(1,)], 30,
               "the change to go round through the merged server")
    assert node.stop() == 0


def test_an_early_exit_of_the_embedded_server_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        node = NodeProc(tmp_path / "n1", 1, {"nats": {"bind_address": f"127.0.0.1:{port}"}})
        node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        out = cli("-config", str(node.config_path))
    assert out.returncode == 1
    assert "address already in use" in out.stderr, out.stderr


def test_config_flags_harmonylite_accepts(tmp_path: Path) -> None:
    missing = cli("-config", str(tmp_path / "missing.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr, missing.stderr
    node = NodeProc(tmp_path / "n1", 7, {})
    out = cli("-config", str(node.config_path), "-node-id", "0", "-pprof", "127.0.0.1:6060",
              "-schema-status")
    combined = out.stdout + out.stderr
    assert "[node 7]" in combined  # -node-id 0 overrides nothing
    assert "-pprof 127.0.0.1:6060 ignored" in combined
    if not (Path(__file__).parents[2] / "src/harmonylite/cli/schema.py").exists():
        assert out.returncode == 1 and "not available" in out.stderr
    cluster = cli("-config", str(node.config_path), "-schema-status-cluster")
    assert "unrecognized arguments" not in cluster.stderr


def test_unsigned_64_bit_node_ids_publish_and_are_kept_in_dead_letters(
        tmp_path: Path, nats_server: NatsServer) -> None:
    nats = {"nats": {"urls": [nats_server.url]}}
    a = NodeProc(tmp_path / "a", U64_MAX, nats)
    b = NodeProc(tmp_path / "b", 2**63 + 5, nats)
    a.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER)")
    b.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER CHECK (v < 100))")
    a.start()
    b.start()
    a.execute("INSERT INTO t VALUES (1, 5)")
    a.execute("INSERT INTO t VALUES (2, 500)")  # refused by b's CHECK: dead-lettered there
    wait_until(lambda: b.query("SELECT count(*) FROM __harmonylite__dead_letter") == [(1,)], 30,
               "the dead letter on b")
    assert b.query("SELECT id, v FROM t") == [(1, 5)]
    out = cli("-config", str(b.config_path), "dead-letters", "list", "--json")
    assert out.returncode == 0, out.stderr
    assert [d["origin"] for d in json.loads(out.stdout)] == [U64_MAX]
    assert f"[node {U64_MAX}]" in a.log_text()
    assert a.stop() == 0 and b.stop() == 0


# HarmonyLite's capture layout (see docs/migrating-from-harmonylite.md): per table a change log
# with val_<column> copies, a global ordering table, and triggers that skip its own replicator.
def harmonylite_layout(conn: sqlite3.Connection, table: str, columns: list[str]) -> None:
    log = f"__harmonylite__{table}_change_log"
    vals = ", ".join(f"val_{c}" for c in columns)
    conn.executescript(f"""
        CREATE TABLE IF NOT EXISTS __harmonylite___change_log_global (
            id INTEGER PRIMARY KEY AUTOINCREMENT, change_table_id INTEGER, table_name TEXT);
        CREATE TABLE {log} (id INTEGER PRIMARY KEY AUTOINCREMENT,
            {", ".join(f"val_{c}" for c in columns)}, type TEXT, created_at INTEGER,
            state INTEGER);
        CREATE INDEX {log}_state_index ON {log} (state);""")
    for op, row in (("insert", "NEW"), ("update", "NEW"), ("delete", "OLD")):
        conn.execute(f"""
            CREATE TRIGGER {log}_on_{op} AFTER {op.upper()} ON {table}
            WHEN (SELECT COUNT(*) FROM pragma_function_list
                  WHERE name='harmonylite_version') < 1
            BEGIN
              INSERT INTO {log}({vals}, type, created_at, state)
              VALUES ({", ".join(f"{row}.{c}" for c in columns)}, '{op}',
                      CAST(strftime('%s','now') AS INT) * 1000, 0);
              INSERT INTO __harmonylite___change_log_global (change_table_id, table_name)
              VALUES (last_insert_rowid(), '{table}');
            END""")


def test_a_harmonylite_database_is_taken_over(tmp_path: Path, nats_server: NatsServer) -> None:
    nats = {"nats": {"urls": [nats_server.url]}}
    old = NodeProc(tmp_path / "old", 11, {**nats, "seq_map_path": str(tmp_path / "hl-sm.cbor")})
    fresh = NodeProc(tmp_path / "fresh", 12, nats)
    for node in (old, fresh):
        node.execute("CREATE TABLE books(id INTEGER PRIMARY KEY, title TEXT NOT NULL)")
        node.execute("INSERT INTO books VALUES (1, 'one'), (2, 'two'), (3, 'three')")
    conn = old.connect()
    harmonylite_layout(conn, "books", ["id", "title"])
    conn.execute("UPDATE books SET title = 'sent' WHERE id = 1")
    conn.execute("UPDATE __harmonylite__books_change_log SET state = 1")  # already published
    conn.execute("UPDATE books SET title = 'pending update' WHERE id = 2")
    conn.execute("DELETE FROM books WHERE id = 3")
    conn.execute("INSERT INTO books VALUES (4, 'pending insert')")
    conn.close()
    # HarmonyLite's positions: the stream already holds a message in its format, applied.
    stream = "harmonylite-changes-c-1"
    (tmp_path / "hl-sm.cbor").write_bytes(cbor2.dumps({stream: 1}))
    fresh.start()  # creates the stream; then a message in HarmonyLite's format lands in it
    asyncio.run(_publish(nats_server.url, "harmonylite-change-log-1",
                         cbor2.dumps({"FromNodeId": 11, "Payload": {}})))
    old.start()
    assert "took over a HarmonyLite database" in old.log_text()
    wait_until(lambda: fresh.query("SELECT * FROM books ORDER BY id")
               == [(1, "one"), (2, "pending update"), (4, "pending insert")], 30,
               "HarmonyLite's pending changes to reach the other node")
    assert old.query("SELECT name FROM sqlite_master WHERE name LIKE '%change_log%'") == []
    assert old.query("SELECT count(*) FROM __harmonylite__dead_letter") == [(0,)]  # seq-map read
    old.execute("UPDATE books SET title = 'after' WHERE id = 4")  # captured once, by us
    wait_until(lambda: fresh.query("SELECT title FROM books WHERE id = 4") == [("after",)], 30,
               "a write after the takeover")
    assert old.stop() == 0 and fresh.stop() == 0


def test_cleanup_removes_both_layouts(tmp_path: Path) -> None:
    node = NodeProc(tmp_path / "n1", 1, {})
    node.execute("CREATE TABLE books(id INTEGER PRIMARY KEY, title TEXT)")
    conn = node.connect()
    harmonylite_layout(conn, "books", ["id", "title"])
    conn.execute("INSERT INTO books VALUES (1, 'pending')")
    conn.close()
    out = cli("-config", str(node.config_path), "-cleanup")
    assert out.returncode == 0, out.stderr
    assert "discarding HarmonyLite's pending change: insert 'books' key [1]" in out.stderr
    assert node.query("SELECT type, name FROM sqlite_master WHERE name LIKE '__harmonylite%'") \
        == []


def test_a_missing_s3_bucket_is_created(tmp_path: Path) -> None:
    from storage_servers import SeaweedFS

    weed = SeaweedFS(tmp_path / "weed").start()
    try:
        s3 = {"endpoint": weed.endpoint, "bucket": "not-yet-there", "force_path_style": True,
              "use_ssl": False, "access_key": weed.access_key, "secret": weed.secret_key,
              "region": "us-east-1"}
        node = NodeProc(tmp_path / "n1", 1, {"snapshot": {"enabled": True, "store": "s3",
                                                          "s3": s3}})
        node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        out = cli("-config", str(node.config_path), "-save-snapshot")
        assert out.returncode == 0, out.stderr
        assert "created S3 bucket 'not-yet-there'" in out.stderr
        listed = weed.client().list_objects_v2(Bucket="not-yet-there")
        assert any(o["Key"].endswith(".json") for o in listed.get("Contents", []))
    finally:
        weed.stop()


def test_a_bucket_the_credentials_may_not_create_is_named_in_the_error(tmp_path: Path) -> None:
    """An operator who withholds s3:CreateBucket gets an error naming the bucket and the
    permission, not a generic failure later."""
    from storage_servers import SeaweedFS

    weed = SeaweedFS(tmp_path / "weed", identities={"reader": ["Read", "List", "Write"]}).start()
    try:
        s3 = {"endpoint": weed.endpoint, "bucket": "nobody-made-me", "force_path_style": True,
              "use_ssl": False, "access_key": "reader", "secret": "reader-secret",
              "region": "us-east-1"}
        node = NodeProc(tmp_path / "n1", 1, {"snapshot": {"enabled": True, "store": "s3",
                                                          "s3": s3}})
        node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        out = cli("-config", str(node.config_path), "-save-snapshot")
        assert out.returncode != 0
        assert "S3 bucket 'nobody-made-me' does not exist and these credentials may not create " \
               "it" in out.stderr, out.stderr
        assert "s3:CreateBucket" in out.stderr
        assert "reader-secret" not in out.stderr  # credentials never printed
        names = [b["Name"] for b in weed.client().list_buckets().get("Buckets", [])]
        assert "nobody-made-me" not in names
    finally:
        weed.stop()
