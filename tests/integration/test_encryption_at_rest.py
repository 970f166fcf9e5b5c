"""Snapshots sealed with age, with real nodes, a real nats-server and a directory store.

The node that writes needs only the public keys; a node restores with the identity, and one
without it stops with an error naming the object and its recipients. Operators' commands run with
configs differing only in ``[snapshot.encryption]`` (a key rotation as it happens: new configs,
the same store).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from snapshot_helpers import tmpfs

from harmonylite.age_keys import load_keys, new_identity
from harmonylite.cdc.install import install
from harmonylite.config import Config, parse_config
from harmonylite.errors import NoSpaceError, SealError
from harmonylite.restore.verify import restore_to_path
from harmonylite.snapshot.manifest import find_snapshot, list_snapshots
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage import SealedStore, open_store
from harmonylite.storage.file import FileStore
from harmonylite.storage.sealed import MAGIC, seal_key
from nodes import NodeProc, wait_until, write_toml
from servers import NatsServer

SECRET_VALUE = "secret-row-value-7f3a"
SCHEMA = "CREATE TABLE patients(id INTEGER PRIMARY KEY, note TEXT)"


def base_cfg(server: NatsServer, store: Path) -> dict[str, Any]:
    return {
        "nats": {"urls": [server.url], "connect_retries": 0, "reconnect_wait_seconds": 1},
        "replication_log": {"shards": 1, "max_entries": 1000},
        "snapshot": {"enabled": True, "store": "file", "file": {"path": str(store)},
                     "interval": 0, "leader_ttl": 3_600_000},
    }


def with_encryption(cfg: dict[str, Any], recipients: list[str], identities: Path | None = None
                    ) -> dict[str, Any]:
    enc: dict[str, Any] = {"recipients": recipients}
    if identities is not None:
        enc["identity_file"] = str(identities)
    return {**cfg, "snapshot": {**cfg["snapshot"], "encryption": enc}}


def identity_file(path: Path, *secrets: str) -> Path:
    path.write_text("".join(f"{s}\n" for s in secrets))
    path.chmod(0o600)
    return path


def harmonylite(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(config), *args],
                          capture_output=True, text=True, timeout=120)


def config_file(path: Path, db: Path, cfg: dict[str, Any]) -> Path:
    write_toml(path, {"db_path": str(db), "node_id": 1, **cfg})
    return path


def save(config: Path) -> str:
    """``snapshot save``; exit 75 (a capture of the leader's own is running) means: again."""
    runs: list[subprocess.CompletedProcess[str]] = []

    def answered() -> bool:
        runs.append(harmonylite(config, "snapshot", "save"))
        return runs[-1].returncode != 75

    wait_until(answered, 60, "snapshot save to find no capture running")
    assert runs[-1].returncode == 0, runs[-1].stderr
    return runs[-1].stdout.strip()


def write(node: NodeProc, ids: range) -> None:
    conn = node.connect()
    try:
        for i in ids:
            conn.execute("INSERT INTO patients VALUES (?, ?)", (i, f"{SECRET_VALUE} {i}"))
    finally:
        conn.close()


def rows(db: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT id, note FROM patients ORDER BY id").fetchall()
    finally:
        conn.close()


def data_object(store: Path, snapshot_id: str) -> Path:
    return store / "snapshots" / f"{snapshot_id}.db.zst"


def test_new_node_restores_a_sealed_snapshot_and_one_without_identity_stops(
        tmp_path: Path, nats_server: NatsServer) -> None:
    secret, public = new_identity()
    store = tmp_path / "store"
    cfg = base_cfg(nats_server, store)
    # The writer holds the public key only.
    a = NodeProc(tmp_path / "a", 1, with_encryption(cfg, [public]))
    a.execute(SCHEMA)
    a.start()
    write(a, range(1, 31))
    snap = a.cli("snapshot", "save")
    assert snap.returncode == 0, snap.stderr
    sid = snap.stdout.strip()

    raw = data_object(store, sid).read_bytes()
    assert raw.startswith(MAGIC)
    assert not raw.startswith(b"SQLite format 3") and SECRET_VALUE.encode() not in raw
    manifest_text = (store / "snapshots" / f"{sid}.json").read_text()
    manifest = json.loads(manifest_text)
    assert manifest["encryption"] == {"scheme": "age-x25519", "recipients": [public]}
    assert "patients" not in manifest_text and SECRET_VALUE not in manifest_text
    record = json.loads(Path(f"{data_object(store, sid)}{seal_key('')}").read_text())
    assert record["recipients"] == [public] and secret not in manifest_text
    listed = a.cli("snapshot", "list", "--json")  # listing needs no identity
    assert listed.returncode == 0 and [m["id"] for m in json.loads(listed.stdout)] == [sid]

    # A new node with the identity restores it and replicates on from there.
    ids = identity_file(tmp_path / "age-identity.txt", secret)
    b = NodeProc(tmp_path / "b", 2, with_encryption(cfg, [public], ids)).start()
    assert f"Snapshot restored {sid}" in b.log_text()
    write(a, range(31, 41))
    wait_until(lambda: b.query("SELECT count(*) FROM patients") == [(40,)], 30,
               "b to replicate after its restore")

    # A new node without it stops, naming the object and the recipient, with no database made.
    c = NodeProc(tmp_path / "c", 3, with_encryption(cfg, [public]))
    c.start_async()
    assert c.proc is not None
    assert c.proc.wait(90) == 1
    c.proc = None
    text = c.log_text()
    assert f"snapshots/{sid}.db.zst is sealed with age to {public}" in text, text[-2000:]
    assert "identity_file" in text and secret not in text
    assert not c.db.exists() or rows_or_none(c.db) is None
    a.stop()
    b.stop()


def rows_or_none(db: Path) -> list[tuple[Any, ...]] | None:
    try:
        return rows(db)
    except sqlite3.OperationalError:
        return None


async def test_rotation_and_plain_and_sealed_snapshots_side_by_side(tmp_path: Path) -> None:
    old_secret, old_public = new_identity()
    new_secret, new_public = new_identity()
    store = tmp_path / "store"
    db = tmp_path / "app.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute(SCHEMA)
    install(conn)

    def cfg(recipients: list[str], *keys: str) -> Config:
        enc: dict[str, Any] = {"recipients": recipients}
        if keys:
            path = tmp_path / f"id-{secrets.token_hex(4)}.txt"
            enc["identity_file"] = str(identity_file(path, *keys))
        config, _ = parse_config({"db_path": str(db), "node_id": 1, "snapshot": {
            "store": "file", "file": {"path": str(store)}, "encryption": enc}})
        return config

    async def save_with(config: Config, ids: range) -> str:
        for i in ids:
            conn.execute("INSERT INTO patients VALUES (?, ?)", (i, f"{SECRET_VALUE} {i}"))
        store_ = await open_store(config.snapshot)
        return (await SnapshotPipeline(config, store_).save()).manifest.id

    plain = await save_with(cfg([]), range(1, 11))  # before encryption was turned on
    sealed_old = await save_with(cfg([old_public]), range(11, 21))
    # Rotation: the new public key replaces the old one; restoring nodes list both identities.
    sealed_new = await save_with(cfg([new_public]), range(21, 31))
    conn.close()

    assert data_object(store, plain).read_bytes()[:4] == b"\x28\xb5\x2f\xfd"  # zstd, not sealed
    for sid, public in ((sealed_old, old_public), (sealed_new, new_public)):
        assert data_object(store, sid).read_bytes().startswith(MAGIC)
        assert json.loads((store / "snapshots" / f"{sid}.json").read_text())[
            "encryption"]["recipients"] == [public]

    none, only_new = cfg([]), cfg([new_public], new_secret)
    both = cfg([new_public], new_secret, old_secret)
    reader = await open_store(none.snapshot)
    assert [m.id for m in await list_snapshots(reader)] == [sealed_new, sealed_old, plain]

    async def restore(config: Config, sid: str) -> Path:
        out = tmp_path / f"restored-{secrets.token_hex(4)}.db"
        found = await open_store(config.snapshot)
        await restore_to_path(found, await find_snapshot(found, sid), out)
        return out

    # The old seal does not open with the new identity alone: the error names the old key.
    with pytest.raises(SealError) as err:
        await restore(only_new, sealed_old)
    assert f"snapshots/{sealed_old}.db.zst is sealed with age to {old_public}" in str(err.value)
    with pytest.raises(SealError, match="no identity"):
        await restore(none, sealed_new)
    expected = {plain: 10, sealed_old: 20, sealed_new: 30}
    for config, sid in ((none, plain), (only_new, sealed_new), (both, sealed_old),
                        (both, sealed_new), (both, plain)):
        out = await restore(config, sid)
        assert rows(out) == [(i, f"{SECRET_VALUE} {i}") for i in range(1, expected[sid] + 1)]

    # The commands say the same, with exit 1, and verify opens the old seal with both listed.
    toml = {"db_path": str(db), "node_id": 1, "snapshot": {
        "store": "file", "file": {"path": str(store)},
        "encryption": {"recipients": [new_public], "identity_file": only_new.snapshot.encryption
                       .identity_file}}}
    write_toml(tmp_path / "only-new.toml", toml)
    res = harmonylite(tmp_path / "only-new.toml", "snapshot", "restore", sealed_old, "--output",
                      str(tmp_path / "cli.db"))
    assert res.returncode == 1 and not (tmp_path / "cli.db").exists()
    assert f"snapshots/{sealed_old}.db.zst is sealed with age to {old_public}" in res.stderr
    assert "none of the 1 identities" in res.stderr and old_secret not in res.stderr
    toml["snapshot"]["encryption"]["identity_file"] = both.snapshot.encryption.identity_file
    write_toml(tmp_path / "both.toml", toml)
    verified = harmonylite(tmp_path / "both.toml", "snapshot", "verify", sealed_old)
    assert verified.returncode == 0, verified.stderr


async def test_no_room_to_seal_is_named_no_space(tmp_path: Path) -> None:
    _, public = new_identity()
    store = SealedStore(FileStore(tmp_path / "store"), load_keys([public], ""))
    with tmpfs(tmp_path / "small", "2m") as small:
        src = small / "snap.db.zst"
        src.write_bytes(os.urandom(1536 * 1024))  # the sealed copy beside it cannot fit
        with pytest.raises(NoSpaceError, match="no space left on device") as err:
            await store.upload("snapshots/x.db.zst", src)
        assert err.value.path == str(small)
        assert sorted(os.listdir(small)) == ["snap.db.zst"]  # the partial copy is gone
    assert await store.list("") == []
