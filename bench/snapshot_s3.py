"""A snapshot to S3, end to end, against the floor and against Litestream.

Builds (once, cached in the temp dir) a WAL-mode database of about ``--mb`` MB: mixed text and
integer rows, harmonylite change capture installed and ~50 k pending change-log rows per 300 MB.
Starts SeaweedFS's S3 gateway on loopback (the test suite's server class), then measures per
round, page cache warm:

- floor: ``sqlite3`` CLI ``VACUUM INTO`` a copy + boto3 ``upload_file`` of the raw copy;
- harmonylite: ``harmonylite -config X -save-snapshot`` as a subprocess under ``/usr/bin/time -v``
  (wall time of the whole command, the pipeline's own duration from its log, peak RSS);
- Litestream: ``litestream replicate`` on a copy of the same database to the same S3, from start
  until its first snapshot object (``<path>/0009/...ltx``) is listed in the bucket.

Prints medians over ``--rounds`` and same-round ratios (the machine may be shared: trust ratios
more than seconds).

Usage: python bench/snapshot_s3.py [--mb 300] [--rounds 3] [--dir DIR] [--rebuild]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harmonylite.cdc.install import install
from harmonylite.config import S3Config
from harmonylite.storage.s3 import S3Store

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from storage_servers import SeaweedFS  # noqa: E402

BIN = Path(sys.executable).parent
BUCKET = "bench"
BATCH = 50_000
LOG_ROWS_PER_300MB = 50_000
LOG_ROW_BYTES = 420  # a captured row: the row itself plus its change-log row
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo",
         "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee", "zulu", "order",
         "invoice", "shipped", "pending", "refund", "customer", "account", "balance", "warehouse")
CITIES = ("Lisbon", "Oslo", "Nairobi", "Lima", "Osaka", "Quebec", "Perth", "Tallinn", "Cusco")


# -- the database -------------------------------------------------------------------------------


def _rows(rng: random.Random, start: int, n: int) -> Iterator[tuple[Any, ...]]:
    for i in range(start, start + n):
        note = " ".join(rng.choices(WORDS, k=rng.randint(4, 14)))
        yield (f"user{i}@example.org", f"User {i}", rng.randint(18, 90), rng.randint(0, 10**9),
               rng.choice(CITIES), note, rng.randbytes(40).hex())


INSERT = ("INSERT INTO accounts(email, name, age, balance, city, note, token) "
          "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _db_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int(pages) * int(size)


def build(path: Path, mb: int) -> tuple[int, int]:
    """Fill ``path`` up to ~``mb`` MB; returns (rows, change-log rows)."""
    tmp = path.with_name(path.name + ".building")
    for p in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        p.unlink(missing_ok=True)
    rng = random.Random(mb)
    conn = sqlite3.connect(str(tmp), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = OFF")
    conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, email TEXT NOT NULL, name TEXT, "
                 "age INTEGER, balance INTEGER, city TEXT, note TEXT, token TEXT)")
    conn.execute("CREATE INDEX accounts_email ON accounts(email)")
    log_rows = LOG_ROWS_PER_300MB * mb // 300
    rows = 0
    base_bytes = mb * 1_000_000 - log_rows * LOG_ROW_BYTES
    batch = BATCH
    while (have := _db_bytes(conn)) < base_bytes:
        if rows:  # the last batches shrink to land near the target
            batch = max(1000, min(BATCH, int((base_bytes - have) / (have / rows))))
        conn.execute("BEGIN")
        conn.executemany(INSERT, _rows(rng, rows, batch))
        conn.execute("COMMIT")
        rows += batch
    install(conn)  # from here on every write leaves a pending change-log row
    conn.execute("BEGIN")
    conn.executemany(INSERT, _rows(rng, rows, log_rows))
    conn.execute("COMMIT")
    rows += log_rows
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    tmp.rename(path)
    return rows, log_rows


def describe(path: Path) -> tuple[int, int, int]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT count(*) FROM accounts").fetchone()[0]
        log_rows = conn.execute("SELECT count(*) FROM __harmonylite__log").fetchone()[0]
    finally:
        conn.close()
    return path.stat().st_size, int(rows), int(log_rows)


def warm(path: Path) -> None:
    """Read the file once so every measurement starts with it in the page cache."""
    with path.open("rb") as fh:
        while fh.read(8 << 20):
            pass


# -- the S3 server ------------------------------------------------------------------------------


class BenchSeaweedFS(SeaweedFS):
    """The test suite's SeaweedFS with room for a few GB (the tests cap it at 8 x 64 MB)."""

    def args(self) -> list[str]:
        out = [a for a in super().args()
               if not a.startswith(("-master.volumeSizeLimitMB=", "-volume.max="))]
        return [*out, "-master.volumeSizeLimitMB=1024", "-volume.max=64"]


def empty_prefix(client: Any, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        for obj in page.get("Contents", []):
            client.delete_object(Bucket=BUCKET, Key=obj["Key"])


# -- the measurements ---------------------------------------------------------------------------


@dataclass
class Floor:
    vacuum: float
    upload: float
    size: int

    @property
    def total(self) -> float:
        return self.vacuum + self.upload


def run_floor(db: Path, work: Path, client: Any, transfer: Any, rnd: int) -> Floor:
    out = work / "floor.db"
    out.unlink(missing_ok=True)
    t = time.perf_counter()
    subprocess.run(["sqlite3", str(db), f"VACUUM INTO '{out}'"], check=True)
    vacuum = time.perf_counter() - t
    size = out.stat().st_size
    t = time.perf_counter()
    client.upload_file(str(out), BUCKET, f"floor/{rnd}.db", Config=transfer)
    upload = time.perf_counter() - t
    out.unlink()
    client.delete_object(Bucket=BUCKET, Key=f"floor/{rnd}.db")
    return Floor(vacuum, upload, size)


@dataclass
class Save:
    wall: float  # the whole command: interpreter start, imports, pipeline, exit
    pipeline: float  # SnapshotPipeline.save as logged
    rss_mb: float
    stored: int
    stages: dict[str, float]  # seconds per pipeline stage, from the progress lines


STAGES = ("copy", "sanitize", "compress", "upload", "verify", "commit")


def write_config(path: Path, db: Path, work: Path, s3: SeaweedFS) -> None:
    path.write_text(f"""\
db_path = "{db}"
node_id = 1

[logging]
format = "json"

[snapshot]
store = "s3"
keep = 1
temp_dir = "{work}"

[snapshot.s3]
endpoint = "127.0.0.1:{s3.s3_port}"
bucket = "{BUCKET}"
path = "harmonylite"
region = "us-east-1"
force_path_style = true
use_ssl = false
access_key = "{s3.access_key}"
secret = "{s3.secret_key}"
""")


def vm_hwm_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return 0.0


def _poll_hwm(proc: subprocess.Popen[bytes], peak: list[float]) -> None:
    while proc.poll() is None:
        peak[0] = max(peak[0], vm_hwm_mb(proc.pid))
        time.sleep(0.02)


def run_harmonylite(config: Path) -> Save:
    """The command under ``/usr/bin/time -v`` (peak RSS), its stderr read line by line as it
    comes: the non-terminal progress prints one line per stage, which times the stages."""
    cmd = [str(BIN / "harmonylite"), "-config", str(config), "-save-snapshot"]
    timer = Path("/usr/bin/time")
    if timer.exists():
        cmd = [str(timer), "-v", *cmd]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0.0]
    poller = None
    if not timer.exists():  # fall back to polling VmHWM
        poller = threading.Thread(target=_poll_hwm, args=(proc, peak), daemon=True)
        poller.start()
    assert proc.stderr is not None and proc.stdout is not None
    lines: list[tuple[float, str]] = []
    for raw in proc.stderr:
        lines.append((time.perf_counter(), raw.decode(errors="replace").strip()))
    out = proc.stdout.read()
    proc.wait()
    wall = time.perf_counter() - t
    if poller is not None:
        poller.join()
    text = "\n".join(line for _, line in lines)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"harmonylite -save-snapshot failed ({proc.returncode}):\n{text}")
    rss = peak[0]
    pipeline, stored = float("nan"), 0
    stages: dict[str, float] = {}
    current: tuple[str, float] | None = None
    for at, line in lines:
        word = line.split(" ", 1)[0]
        if word in STAGES or (word == "snapshot" and " saved " in line):
            if current is not None:
                stages[current[0]] = at - current[1]
            current = (word, at) if word in STAGES else None
        elif line.startswith("Maximum resident set size"):
            rss = int(line.rsplit(":", 1)[1]) / 1024
        elif line.startswith("{"):
            rec = json.loads(line)
            if rec.get("message", "").startswith("Snapshot saved"):
                pipeline, stored = float(rec["duration"]), int(rec["stored_bytes"])
    return Save(wall, pipeline, rss, stored, stages)


@dataclass
class Litestream:
    seconds: float
    size: int
    rss_mb: float


def run_litestream(db: Path, work: Path, s3: SeaweedFS, client: Any, rnd: int,
                   timeout: float = 300.0) -> Litestream:
    """Litestream changes the database it replicates (its own tables, checkpoints): it gets a
    copy, made before the clock starts."""
    copy = work / f"litestream-{rnd}.db"
    shutil.copyfile(db, copy)
    warm(copy)
    prefix = f"litestream/{rnd}"
    cfg = work / "litestream.yml"
    cfg.write_text(f"""\
dbs:
  - path: {copy}
    replica:
      type: s3
      bucket: {BUCKET}
      path: {prefix}
      endpoint: {s3.endpoint}
      region: us-east-1
      force-path-style: true
""")
    # No skip-verify: over plain http Litestream 0.5.17 refuses it, as it refuses a CA bundle.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    env.update(AWS_ACCESS_KEY_ID=s3.access_key, AWS_SECRET_ACCESS_KEY=s3.secret_key)
    log = (work / "litestream.log").open("ab")
    t = time.perf_counter()
    proc = subprocess.Popen([str(BIN / "litestream"), "replicate", "-config", str(cfg)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    rss = 0.0
    try:
        while True:
            rss = max(rss, vm_hwm_mb(proc.pid))
            found = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/0009/").get("Contents")
            if found:
                seconds = time.perf_counter() - t
                size = int(found[0]["Size"])
                break
            if proc.poll() is not None:
                raise RuntimeError(f"litestream exited with {proc.returncode}; see {log.name}")
            if time.perf_counter() - t > timeout:
                raise TimeoutError(f"no Litestream snapshot after {timeout} s")
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        for p in (copy, Path(f"{copy}-wal"), Path(f"{copy}-shm")):
            p.unlink(missing_ok=True)
        shutil.rmtree(work / f".{copy.name}-litestream", ignore_errors=True)
    empty_prefix(client, f"{prefix}/")
    return Litestream(seconds, size, rss)


# -- main ---------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=300, help="database size to build, MB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None, help="parent of the cache and work dirs")
    ap.add_argument("--rebuild", action="store_true", help="rebuild the cached database")
    ap.add_argument("--no-litestream", action="store_true")
    args = ap.parse_args()

    base = Path(args.dir or tempfile.gettempdir()) / "harmonylite-bench-s3"
    base.mkdir(parents=True, exist_ok=True)
    db = base / f"app-{args.mb}mb.db"
    if args.rebuild or not db.exists():
        t = time.perf_counter()
        build(db, args.mb)
        print(f"built {db} in {time.perf_counter() - t:.1f} s")
    size, rows, log_rows = describe(db)
    print(f"database: {size / 1e6:.1f} MB, {rows} rows, {log_rows} pending change-log rows")

    work = Path(tempfile.mkdtemp(prefix="run-", dir=base))
    s3 = BenchSeaweedFS(work / "seaweedfs")
    try:
        s3.start()
        s3.create_bucket(BUCKET)
        # The floor uploads through the S3 store's own client and transfer settings, so the
        # ratio shows what the pipeline adds, not a difference in boto3 tuning.
        store = S3Store(S3Config(endpoint=s3.endpoint, bucket=BUCKET, region="us-east-1",
                                 force_path_style=True, use_ssl=False, access_key=s3.access_key,
                                 secret=s3.secret_key))
        client = store._client
        config = work / "harmonylite.toml"
        write_config(config, db, work, s3)
        floors: list[Floor] = []
        saves: list[Save] = []
        lites: list[Litestream] = []
        for rnd in range(args.rounds):
            warm(db)
            floors.append(run_floor(db, work, client, store._transfer, rnd))
            warm(db)
            saves.append(run_harmonylite(config))
            if not args.no_litestream:
                lites.append(run_litestream(db, work, s3, client, rnd))
            f, s = floors[-1], saves[-1]
            line = (f"round {rnd + 1}: floor {f.total:.2f} s (VACUUM INTO {f.vacuum:.2f} + upload "
                    f"{f.upload:.2f}), harmonylite {s.wall:.2f} s (pipeline {s.pipeline:.2f}), "
                    f"peak RSS {s.rss_mb:.0f} MB, x{s.wall / f.total:.2f} floor")
            if lites:
                line += f", litestream {lites[-1].seconds:.2f} s"
            print(line, flush=True)

        print()
        print(f"medians of {args.rounds} rounds, {size / 1e6:.0f} MB database "
              "(ratios: median of the same-round ratios)")
        fl, sv = med([f.total for f in floors]), med([s.wall for s in saves])
        print(f"{'floor: VACUUM INTO + upload raw':<44} {fl:7.2f} s  "
              f"({med([f.vacuum for f in floors]):.2f} + {med([f.upload for f in floors]):.2f}), "
              f"stored {floors[0].size / 1e6:.1f} MB")
        print(f"{'harmonylite -save-snapshot (whole command)':<44} {sv:7.2f} s  "
              f"stored {saves[0].stored / 1e6:.1f} MB")
        print(f"{'  of which SnapshotPipeline.save':<44} {med([s.pipeline for s in saves]):7.2f} s")
        print("  stages: " + ", ".join(
            f"{name} {med([s.stages.get(name, 0.0) for s in saves]):.2f}" for name in STAGES))
        ratio = med([s.wall / f.total for s, f in zip(saves, floors, strict=True)])
        print(f"{'harmonylite / floor':<44} {ratio:7.2f} x  (target <= 1.5)")
        rss = max(s.rss_mb for s in saves)
        print(f"{'harmonylite peak RSS (max of rounds)':<44} {rss:7.0f} MB (target < 150)")
        print(f"RESULT snapshot_save seconds={sv:.2f} floor_s={fl:.2f} ratio={ratio:.2f} "
              f"rss_mb={rss:.0f} db_mb={size / 1e6:.0f} target<=1.0 "
              f"{'PASS' if ratio <= 1.0 else 'FAIL'}")
        if lites:
            lt = med([x.seconds for x in lites])
            lr = med([x.seconds / s.wall for x, s in zip(lites, saves, strict=True)])
            print(f"{'litestream start -> first snapshot in S3':<44} {lt:7.2f} s  "
                  f"stored {lites[0].size / 1e6:.1f} MB, "
                  f"peak RSS {max(x.rss_mb for x in lites):.0f} MB")
            print(f"{'litestream / harmonylite':<44} {lr:7.2f} x  "
                  f"({'harmonylite faster' if lr > 1 else 'litestream faster'})")
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
