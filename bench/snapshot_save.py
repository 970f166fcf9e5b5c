"""What the snapshot pipeline costs, and what reclaiming the change log's space costs.

Builds a WAL database with change capture installed and a change log that holds ``--log-share``
of its rows, then measures (medians of ``--rounds``):

- sanitize variants on a ``VACUUM INTO`` copy, each followed by zstd-3 on 2 threads:
  ``plain`` (drop only), ``secure_delete`` (drop with freed pages zeroed — what the pipeline
  does) and ``vacuum`` (drop, then the seed's in-place VACUUM);
- the whole pipeline (SnapshotPipeline.save to a file store) and a verified restore.

Usage: python bench/snapshot_save.py [--rows 600000] [--rounds 3] [--dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from harmonylite.cdc.install import install, remove_all
from harmonylite.config import parse_config
from harmonylite.restore.verify import restore_to_path
from harmonylite.snapshot import packing
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage.file import FileStore


def build(path: Path, rows: int, log_share: float) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
                 "score REAL, bio TEXT)")
    conn.execute("CREATE INDEX users_email ON users(email)")
    conn.execute("BEGIN")
    base = int(rows * (1 - log_share))
    for i in range(base):  # loaded before capture: no change-log rows
        conn.execute("INSERT INTO users(name, email, score, bio) VALUES (?, ?, ?, ?)",
                     (f"user {i}", f"user{i}@example.org", i * 0.37,
                      f"bio of user {i} " * 8 + os.urandom(24).hex()))
    conn.execute("COMMIT")
    install(conn)
    conn.execute("BEGIN")
    for i in range(base, rows):  # captured: each leaves a change-log row
        conn.execute("INSERT INTO users(name, email, score, bio) VALUES (?, ?, ?, ?)",
                     (f"user {i}", f"user{i}@example.org", i * 0.37,
                      f"bio of user {i} " * 8 + os.urandom(24).hex()))
    conn.execute("INSERT INTO __harmonylite__seq VALUES ('harmonylite-changes-c-1', 99)")
    conn.execute("COMMIT")
    conn.close()


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sanitize_variant(copy: Path, variant: str) -> None:
    if variant == "secure_delete":
        packing.sanitize(copy)
        return
    conn = sqlite3.connect(str(copy), isolation_level=None)
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.execute("PRAGMA journal_mode = OFF")
    conn.execute("PRAGMA synchronous = OFF")
    # Some SQLite builds (Debian's among them) default to secure_delete = ON: turn it off so
    # "plain" really leaves the change log's bytes in the freed pages.
    conn.execute("PRAGMA secure_delete = OFF")
    remove_all(conn)
    if variant == "vacuum":
        conn.execute("VACUUM")
    conn.execute("PRAGMA journal_mode = DELETE")
    conn.close()


def one_variant(db: Path, work: Path, variant: str) -> tuple[float, float, float, int, int]:
    copy = work / f"{variant}.db"
    cancel = threading.Event()
    t_copy = timed(lambda: packing.vacuum_into(db, copy, cancel))
    t_san = timed(lambda: sanitize_variant(copy, variant))
    packed: list[packing.Packed] = []
    t_zst = timed(lambda: packed.append(packing.pack(copy, "zstd", lambda n: None, cancel)))
    result = (t_copy, t_san, t_zst, packed[0].db_bytes, packed[0].stored_bytes)
    copy.unlink()
    packed[0].path.unlink()
    return result


async def pipeline_round(db: Path, work: Path) -> tuple[float, float, int]:
    store_dir = work / "store"
    cfg, _ = parse_config({"db_path": str(db), "node_id": 1, "snapshot": {
        "store": "file", "keep": 1, "temp_dir": str(work), "file": {"path": str(store_dir)}}})
    store = FileStore(store_dir)
    result = await SnapshotPipeline(cfg, store).save()
    out = work / "restored.db"
    t = time.perf_counter()
    await restore_to_path(store, result.manifest, out, temp_dir=str(work))
    t_restore = time.perf_counter() - t
    out.unlink()
    return result.duration, t_restore, result.manifest.stored_bytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=600_000)
    ap.add_argument("--log-share", type=float, default=0.15)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.dir))
    try:
        db = work / "app.db"
        build(db, args.rows, args.log_share)
        size = db.stat().st_size + (Path(f"{db}-wal").stat().st_size
                                    if Path(f"{db}-wal").exists() else 0)
        print(f"database: {size / 1e6:.1f} MB, {args.rows} rows, "
              f"{args.log_share:.0%} of them with a change-log row")
        print(f"{'variant':<14} {'copy s':>7} {'sanitize s':>10} {'zstd s':>7} {'total s':>8} "
              f"{'db MB':>7} {'stored MB':>10}")
        for variant in ("plain", "secure_delete", "vacuum"):
            runs = [one_variant(db, work, variant) for _ in range(args.rounds)]
            med = [statistics.median(r[i] for r in runs) for i in range(3)]
            print(f"{variant:<14} {med[0]:7.2f} {med[1]:10.2f} {med[2]:7.2f} {sum(med):8.2f} "
                  f"{runs[0][3] / 1e6:7.1f} {runs[0][4] / 1e6:10.2f}")
        rounds = [asyncio.run(pipeline_round(db, work)) for _ in range(args.rounds)]
        print(f"pipeline save (file store): {statistics.median(r[0] for r in rounds):.2f} s, "
              f"stored {rounds[0][2] / 1e6:.2f} MB; verified restore: "
              f"{statistics.median(r[1] for r in rounds):.2f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
