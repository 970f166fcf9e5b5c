"""Shared pieces of the snapshot tests: a real database with change capture, configs, tmpfs."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harmonylite.cdc.install import install
from harmonylite.config import Config, parse_config

SEQS = {"harmonylite-changes-c-1": 1234, "harmonylite-changes-c-2": 77}


def make_db(path: Path, rows: int = 2000, *, blob: int = 0, seqs: dict[str, int] | None = None
            ) -> sqlite3.Connection:
    """A WAL database with two user tables, triggers installed, pending change-log rows and
    applied sequences; returns an open connection (the caller closes it)."""
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL, data BLOB)")
    conn.execute('CREATE TABLE "odd ""name""" (k TEXT, v REAL)')  # rowid-keyed, quoted name
    conn.execute("CREATE INDEX items_name ON items(name)")
    install(conn)
    conn.execute("BEGIN")
    for i in range(rows):
        conn.execute("INSERT INTO items(name, data) VALUES (?, ?)",
                     (f"item-{i}", os.urandom(blob) if blob else b"x" * 50))
        conn.execute('INSERT INTO "odd ""name"""(k, v) VALUES (?, ?)', (f"k{i}", i / 7))
    for stream, seq in (SEQS if seqs is None else seqs).items():
        conn.execute("INSERT OR REPLACE INTO __harmonylite__seq(stream, seq) VALUES (?, ?)",
                     (stream, seq))
    conn.execute("COMMIT")
    return conn


def make_cfg(db: Path, store_dir: Path, *, temp_dir: Path | None = None, keep: int = 3,
             compress: bool = True, store: str = "file", node_id: int = 7,
             extra: dict[str, Any] | None = None) -> Config:
    snap: dict[str, Any] = {"store": store, "keep": keep, "compress": compress,
                            "file": {"path": str(store_dir)}}
    if temp_dir is not None:
        snap["temp_dir"] = str(temp_dir)
    snap.update(extra or {})
    cfg, _ = parse_config({"db_path": str(db), "node_id": node_id, "snapshot": snap})
    return cfg


def with_snapshot(cfg: Config, **changes: Any) -> Config:
    return dataclasses.replace(cfg, snapshot=dataclasses.replace(cfg.snapshot, **changes))


def rows_of(path: Path) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    conn = sqlite3.connect(str(path))
    try:
        items = conn.execute("SELECT id, name, data FROM items ORDER BY id").fetchall()
        odd = conn.execute('SELECT rowid, k, v FROM "odd ""name""" ORDER BY rowid').fetchall()
    finally:
        conn.close()
    return items, odd


def work_dirs(root: Path) -> list[Path]:
    return sorted(root.glob("harmonylite-snapshot-*"))


@contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a small tmpfs at ``path`` (needs root); skips the test when mounting is impossible."""
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.strip() or res.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path, leave: int) -> Path:
    """Fill the filesystem holding ``path`` until only about ``leave`` bytes are free."""
    filler = path / "filler"
    free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
    with filler.open("wb") as fh:
        remaining = max(free - leave, 0)
        chunk = b"\0" * (1 << 16)
        while remaining > 0:
            n = min(remaining, len(chunk))
            try:
                fh.write(chunk[:n])
                fh.flush()
            except OSError:
                break
            remaining -= n
    return filler
