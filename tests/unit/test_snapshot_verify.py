"""Verification names the check that failed; the CLI verbs and their exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import json
import os
import sqlite3
from pathlib import Path

import pytest
import zstandard

from harmonylite.cdc.install import install
from harmonylite.config import Config, parse_config
from harmonylite.errors import VerificationError
from harmonylite.restore.verify import restore_to_path, verify_snapshot
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage.file import FileStore

cli = pytest.importorskip("harmonylite.cli.snapshot")


def _cfg(tmp_path: Path, **snap: object) -> Config:
    db = tmp_path / "app.db"
    if not db.exists():
        conn = sqlite3.connect(str(db), isolation_level=None)
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
        install(conn)
        conn.executemany("INSERT INTO t(v) VALUES (?)", [(f"row {i}" * 20,) for i in range(2000)])
        conn.close()
    data = {"store": "file", "file": {"path": str(tmp_path / "store")}} | snap
    cfg, _ = parse_config({"db_path": str(db), "node_id": 5, "snapshot": data})
    return cfg


async def _cli(cfg: Config, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(cfg, list(argv), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


async def _saved(tmp_path: Path, **snap: object) -> tuple[Config, FileStore, Manifest]:
    cfg = _cfg(tmp_path, **snap)
    store = FileStore(tmp_path / "store")
    return cfg, store, (await SnapshotPipeline(cfg, store).save()).manifest


def _object(tmp_path: Path, m: Manifest) -> Path:
    return tmp_path / "store" / m.data_key


async def _replace(store: FileStore, m: Manifest, data: bytes, **fields: object) -> Manifest:
    """Store ``data`` as the snapshot's object with a manifest that matches it (or ``fields``)."""
    changes: dict[str, object] = {"stored_bytes": len(data),
                                  "stored_sha256": hashlib.sha256(data).hexdigest()} | fields
    new = dataclasses.replace(m, **changes)  # type: ignore[arg-type]
    await store.upload_bytes(new.data_key, data)
    await store.upload_bytes(new.manifest_key, new.to_json())
    return new


async def test_truncated_object_fails_size(tmp_path: Path) -> None:
    cfg, store, m = await _saved(tmp_path)
    obj = _object(tmp_path, m)
    obj.write_bytes(obj.read_bytes()[:-10])
    with pytest.raises(VerificationError) as info:
        await verify_snapshot(store, m)
    assert info.value.check == "size"
    code, _, err = await _cli(cfg, "verify", m.id)
    assert code == 1 and "check size" in err


async def test_flipped_byte_fails_sha256(tmp_path: Path) -> None:
    cfg, _, m = await _saved(tmp_path)
    obj = _object(tmp_path, m)
    raw = bytearray(obj.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    obj.write_bytes(bytes(raw))
    code, out, err = await _cli(cfg, "verify", "latest")
    assert code == 1 and "check sha256" in err and out == ""
    out_path = tmp_path / "restored.db"
    code, _, err = await _cli(cfg, "restore", "--output", str(out_path))
    assert code == 1 and "check sha256" in err
    assert not out_path.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".restored.db.partial-")]


async def test_garbage_with_matching_hash_fails_decompress(tmp_path: Path) -> None:
    _, store, m = await _saved(tmp_path)
    bad = await _replace(store, m, b"\x28\xb5\x2f\xfd" + b"not zstd at all" * 50)
    with pytest.raises(VerificationError) as info:
        await verify_snapshot(store, bad)
    assert info.value.check == "decompress"


async def test_wrong_database_hash_fails_sha256(tmp_path: Path) -> None:
    _, store, m = await _saved(tmp_path, compress=False)
    bad = dataclasses.replace(m, db_sha256="0" * 64)
    with pytest.raises(VerificationError) as info:
        await verify_snapshot(store, bad)
    assert info.value.check == "sha256"


async def test_corrupt_pages_fail_integrity_check(tmp_path: Path) -> None:
    cfg, store, m = await _saved(tmp_path)
    good = tmp_path / "good.db"
    await restore_to_path(store, m, good)
    conn = sqlite3.connect(str(good))
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 't'").fetchone()[0]
    conn.close()
    raw = bytearray(good.read_bytes())
    start = (root - 1) * page
    for i in range(start + 12, start + 200):  # scribble over the table's root page cells
        raw[i] = 0x5A
    data = zstandard.ZstdCompressor().compress(bytes(raw))
    await _replace(store, m, data, db_bytes=len(raw),
                   db_sha256=hashlib.sha256(raw).hexdigest())
    code, _, err = await _cli(cfg, "verify")
    assert code == 1 and "check integrity_check" in err
    # restore --output proves the bytes by hash; --integrity-check runs the check again too.
    code, _, err = await _cli(cfg, "restore", "--output", str(tmp_path / "r.db"),
                              "--integrity-check")
    assert code == 1 and "check integrity_check" in err
    assert not (tmp_path / "r.db").exists()


async def test_cli_save_list_verify_restore(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, keep=2)
    ids = []
    for _ in range(3):
        code, out, _ = await _cli(cfg, "save")
        assert code == 0
        ids.append(out.strip())
    code, out, _ = await _cli(cfg, "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "CREATED_AT", "NODE_ID", "DB_BYTES", "STORED_BYTES",
                                "SEQUENCES"]
    assert [ln.split()[0] for ln in lines[1:]] == [ids[2], ids[1]]
    code, out, _ = await _cli(cfg, "list", "--json")
    listed = json.loads(out)
    assert [m["id"] for m in listed] == [ids[2], ids[1]]
    assert listed[0]["format"] == 1
    code, out, err = await _cli(cfg, "verify", ids[1])
    assert (code, out) == (0, f"{ids[1]} ok\n")
    assert "behind stream heads: unknown (manifest records no heads)" in err
    target = tmp_path / "r.db"
    code, out, _ = await _cli(cfg, "restore", ids[1], "-output", str(target))
    assert (code, out) == (0, f"{target}\n")
    conn = sqlite3.connect(str(target))
    assert conn.execute("SELECT count(*) FROM t").fetchone() == (2000,)
    conn.close()
    code, _, err = await _cli(cfg, "restore", "--output", str(target))
    assert code == 1 and "already exists" in err


async def test_cli_usage_errors(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    code, _, err = await _cli(cfg, "restore", "--output")  # restore without it: test_recovery
    assert code == 2 and "--output" in err
    code, _, err = await _cli(cfg, "frobnicate")
    assert code == 2
    code, _, err = await _cli(cfg, "verify", "not-an-id")
    assert code == 1 and "invalid snapshot id" in err
    code, _, err = await _cli(cfg, "verify")
    assert code == 1 and "no committed snapshot" in err
    code, _, _ = await _cli(cfg, "--help")
    assert code == 0


async def test_cli_save_while_capturing_exits_75(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    store = FileStore(tmp_path / "store")
    results = await asyncio.gather(SnapshotPipeline(cfg, store).save(), _cli(cfg, "save"),
                                   return_exceptions=True)
    assert not isinstance(results[0], BaseException)
    assert isinstance(results[1], tuple)
    code, out, err = results[1]
    assert code == 75 and "system busy capturing snapshot" in err and out == ""
    assert len(await list_snapshots(store)) == 1


def test_check_sound_names_a_damaged_copy(tmp_path: Path) -> None:
    import sqlite3 as sq

    from harmonylite.snapshot.packing import check_sound

    db = tmp_path / "copy.db"
    conn = sq.connect(db)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    conn.execute("CREATE INDEX tv ON t(v)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", ((i, f"value {i}") for i in range(5000)))
    conn.commit()
    conn.close()
    assert check_sound(db) == ""
    raw = bytearray(db.read_bytes())
    for off in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[off] ^= 0x5A
    db.write_bytes(bytes(raw))
    assert check_sound(db) != ""
