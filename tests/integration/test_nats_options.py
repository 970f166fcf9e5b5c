"""External NATS servers: user/password, NKEY, TLS, payload limit, stream updates."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import nats
import nkeys
import pytest

from harmonylite.bus.names import namespace
from harmonylite.bus.streams import ensure_streams
from harmonylite.config import parse_config
from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)"


def pair(tmp_path: Path, nats_cfg: dict[str, object]) -> list[NodeProc]:
    nodes = []
    for i in (1, 2):
        node = NodeProc(tmp_path / f"n{i}", i, {"nats": nats_cfg})
        node.execute(SCHEMA)
        nodes.append(node)
    return nodes


def replicates(a: NodeProc, b: NodeProc, rid: int) -> None:
    a.execute("INSERT INTO t VALUES (?, x'01')", (rid,))
    wait_until(lambda: b.query("SELECT id FROM t WHERE id = ?", (rid,)) == [(rid,)], 15,
               "replication")


def test_user_password_and_secret_never_logged(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "ns", extra_args=["--user", "harmony",
                                                     "--pass", "pw-Zq81xx"]).start()
    try:
        nodes = pair(tmp_path, {"urls": [server.url], "user_name": "harmony",
                                "user_password": "pw-Zq81xx"})
        a, b = (n.start() for n in nodes)
        replicates(a, b, 1)
        for n in nodes:
            n.stop()
        bad = NodeProc(tmp_path / "bad", 3, {"nats": {"urls": [server.url], "user_name": "harmony",
                                                     "user_password": "wrong-pw-77",
                                                     "connect_retries": 0}})
        bad.execute(SCHEMA)
        bad.start_async()
        assert bad.proc is not None
        assert bad.proc.wait(60) == 1
        assert "cannot connect to NATS" in bad.log_text()
        for n in [*nodes, bad]:
            assert "pw-Zq81xx" not in n.log_text() and "wrong-pw-77" not in n.log_text()
    finally:
        server.stop()


def test_nkey_seed_file(tmp_path: Path) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    auth = f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n'
    server = NatsServer(tmp_path / "ns", config=auth).start()
    try:
        nodes = pair(tmp_path, {"urls": [server.url], "seed_file": str(seed_file)})
        a, b = (n.start() for n in nodes)
        replicates(a, b, 1)
        for n in nodes:
            n.stop()
    finally:
        server.stop()


def test_tls_with_ca_file(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    server = NatsServer(tmp_path / "ns", extra_args=["--tls", "--tlscert", str(cert),
                                                     "--tlskey", str(key)]).start()
    try:
        url = f"tls://127.0.0.1:{server.port}"
        nodes = pair(tmp_path, {"urls": [url], "ca_file": str(cert)})
        a, b = (n.start() for n in nodes)
        replicates(a, b, 1)
        for n in nodes:
            n.stop()
    finally:
        server.stop()


def test_change_over_the_payload_limit_is_named_and_arrives_in_order(tmp_path: Path) -> None:
    """A change larger than the server's max_payload is named by table and key in the log and
    travels out of band (see test_large_changes); the change written after it is not applied
    before it."""
    store = tmp_path / "ns"
    server = NatsServer(store).start()  # max_payload 1 MiB
    try:
        nodes = pair(tmp_path, {"urls": [server.url], "reconnect_wait_seconds": 0})
        a, b = (n.start() for n in nodes)
        big = os.urandom(1_500_000)  # incompressible: the message stays over 1 MiB
        a.execute("INSERT INTO t VALUES (7, ?)", (big,))
        a.execute("INSERT INTO t VALUES (8, x'02')")
        seen: list[list[tuple[int, int]]] = []

        def arrived() -> bool:
            seen.append(b.query("SELECT id, length(v) FROM t ORDER BY id"))
            return seen[-1] == [(7, 1_500_000), (8, 1)]
        wait_until(arrived, 40, "the big change and the one after it")
        assert all(rows in ([], [(7, 1_500_000)], [(7, 1_500_000), (8, 1)]) for rows in seen), \
            seen  # never 8 without 7
        assert "change to table 't' key (7,)" in a.log_text()
        for n in nodes:
            n.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("update_existing", [False, True])
def test_existing_stream_limits_change_only_when_asked(nats_server: NatsServer,
                                                       update_existing: bool) -> None:
    async def scenario() -> int:
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        first, _ = parse_config({"replication_log": {"max_entries": 100}})
        await ensure_streams(js, first)
        second, _ = parse_config({"replication_log": {"max_entries": 500,
                                                      "update_existing": update_existing}})
        await ensure_streams(js, second)
        info = await js.stream_info(namespace(second).stream(1))
        await nc.close()
        return int(info.config.max_msgs or 0)

    assert asyncio.run(scenario()) == (500 if update_existing else 100)
