"""What a verified restore from S3 costs, next to its floor and to Litestream.

Starts SeaweedFS (S3) on loopback, builds a database, takes one snapshot of it into the bucket,
uploads the same database uncompressed, and lets ``litestream replicate`` ship it to the same
bucket. Then, each in a fresh child process (medians of ``--rounds``; wall time and the child's
peak RSS from ``wait4``):

- ``floor``: boto3 ``download_file`` of the uncompressed database, then one copy of it (the least
  a restore that also moves the file into place can do);
- ``harmonylite``: ``harmonylite snapshot restore --output`` (download, SHA-256 of the stored
  object, zstd decompress, SHA-256 and size of the database, ``PRAGMA integrity_check``, rename);
- ``litestream``: ``litestream restore -o`` of the same database.

``--baseline SRC`` adds ``baseline``: the same restore with the package imported from another
checkout's ``src`` directory (e.g. ``git archive main src | tar -x -C /tmp/base``), run in the same
rounds, interleaved, for an A/B comparison on a shared machine.

Usage: python bench/snapshot_restore.py [--rows 400000] [--rounds 3] [--dir DIR] [--baseline SRC]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from harmonylite.cdc.install import install
from harmonylite.config import Config, parse_config
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.storage import open_store
from storage_servers import SeaweedFS

BUCKET = "bench"
BIN = Path(sys.executable).parent


def build(path: Path, rows: int) -> None:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, email TEXT, "
                 "score REAL, bio TEXT)")
    conn.execute("CREATE INDEX users_email ON users(email)")
    conn.execute("BEGIN")
    for i in range(rows):
        conn.execute("INSERT INTO users(name, email, score, bio) VALUES (?, ?, ?, ?)",
                     (f"user {i}", f"user{i}@example.org", i * 0.37,
                      f"bio of user {i} " * 8 + os.urandom(24).hex()))
    conn.execute("COMMIT")
    install(conn)
    conn.execute("INSERT INTO __harmonylite__seq VALUES ('harmonylite-changes-c-1', 99)")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def s3_env(s3: SeaweedFS) -> dict[str, str]:
    # The S3 endpoint is plain HTTP; a CA bundle in the environment makes litestream's AWS SDK
    # refuse its own HTTP client.
    env = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    return {**env, "AWS_ACCESS_KEY_ID": s3.access_key,
            "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_REGION": "us-east-1"}


def harmonylite_config(path: Path, db: Path, s3: SeaweedFS, temp: Path) -> Config:
    text = (f'db_path = "{db}"\nnode_id = 1\n[snapshot]\nstore = "s3"\ntemp_dir = "{temp}"\n'
            f'[snapshot.s3]\nendpoint = "{s3.endpoint}"\nbucket = "{BUCKET}"\npath = "hl"\n'
            f'region = "us-east-1"\nforce_path_style = true\nuse_ssl = false\n'
            f'access_key = "{s3.access_key}"\nsecret = "{s3.secret_key}"\n')
    path.write_text(text)
    cfg, _ = parse_config({"db_path": str(db), "node_id": 1, "snapshot": {
        "store": "s3", "temp_dir": str(temp),
        "s3": {"endpoint": s3.endpoint, "bucket": BUCKET, "path": "hl", "region": "us-east-1",
               "force_path_style": True, "use_ssl": False, "access_key": s3.access_key,
               "secret": s3.secret_key}}})
    return cfg


def litestream_config(path: Path, db: Path, s3: SeaweedFS) -> None:
    path.write_text(
        "dbs:\n"
        f"  - path: {db}\n"
        "    replicas:\n"
        "      - type: s3\n"
        f"        bucket: {BUCKET}\n"
        "        path: ls\n"
        f"        endpoint: {s3.endpoint}\n"
        "        region: us-east-1\n"
        "        force-path-style: true\n"
        f"        access-key-id: {s3.access_key}\n"
        f"        secret-access-key: {s3.secret_key}\n")


def ship_with_litestream(cfg: Path, s3: SeaweedFS, work: Path) -> None:
    """Run ``litestream replicate`` until a restore of the database works, then stop it."""
    log = (work / "litestream.log").open("ab")
    env = s3_env(s3)
    proc = subprocess.Popen([str(BIN / "litestream"), "replicate", "-config", str(cfg)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    probe = work / "probe.db"
    try:
        deadline = time.monotonic() + 300
        while True:
            probe.unlink(missing_ok=True)
            res = subprocess.run([str(BIN / "litestream"), "restore", "-config", str(cfg),
                                  "-o", str(probe), str(work / "data.db")], capture_output=True,
                                 env=env)
            if res.returncode == 0 and probe.exists():
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"litestream never replicated: {res.stderr.decode()[-2000:]}")
            time.sleep(1.0)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(30)
        probe.unlink(missing_ok=True)


FLOOR = """
import shutil, sys, boto3
from botocore.config import Config
c = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                 config=Config(s3={"addressing_style": "path"}))
c.download_file(sys.argv[2], "raw/data.db", sys.argv[3])
shutil.copyfile(sys.argv[3], sys.argv[4])
"""


# Linux charges the memory of the process that calls exec to the child's peak RSS: a small
# launcher execs each command, so the figure is the command's own.
LAUNCH = """
import os, sys, time
t = time.monotonic()
pid = os.posix_spawn(sys.argv[1], sys.argv[1:], os.environ)
_, status, usage = os.wait4(pid, 0)
print(time.monotonic() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status),
      usage.ru_utime + usage.ru_stime)
"""


def measure(args: list[str], env: dict[str, str]) -> tuple[float, float, float]:
    """Wall seconds, peak RSS (MB) and CPU seconds (user + system) of one child process."""
    res = subprocess.run([sys.executable, "-S", "-c", LAUNCH, *args], env=env,
                         capture_output=True, text=True)
    took, rss_kb, code, cpu = res.stdout.splitlines()[-1].split()
    if int(code) != 0:
        raise RuntimeError(f"{args[0]} failed ({code}): {res.stderr[-2000:]}")
    return float(took), int(rss_kb) / 1024, float(cpu)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--baseline", default=None, help="another checkout's src directory")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-restore-", dir=a.dir))
    s3 = SeaweedFS(work / "s3")
    try:
        s3.start()
        s3.create_bucket(BUCKET)
        db = work / "data.db"
        build(db, a.rows)
        db_mb = db.stat().st_size / 1e6
        temp = work / "tmp"
        temp.mkdir()
        cfg_path = work / "harmonylite.toml"
        cfg = harmonylite_config(cfg_path, db, s3, temp)

        async def save() -> str:
            store = await open_store(cfg.snapshot)
            try:
                return (await SnapshotPipeline(cfg, store).save()).manifest.id
            finally:
                await store.aclose()

        snap = asyncio.run(save())
        s3.client().upload_file(str(db), BUCKET, "raw/data.db")
        ls_cfg = work / "litestream.yml"
        litestream_config(ls_cfg, db, s3)
        ship_with_litestream(ls_cfg, s3, work)
        env = s3_env(s3)
        names = ["floor", "harmonylite", *(["baseline"] if a.baseline else []), "litestream"]
        results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in names}
        out = work / "out.db"
        for _ in range(a.rounds):
            for name in results:
                for p in work.glob("out.db*"):
                    p.unlink()
                (work / "dl.db").unlink(missing_ok=True)
                if name == "floor":
                    cmd = [sys.executable, "-c", FLOOR, s3.endpoint, BUCKET,
                           str(work / "dl.db"), str(out)]
                elif name in ("harmonylite", "baseline"):
                    cmd = [sys.executable, "-m", "harmonylite", "-config", str(cfg_path),
                           "snapshot", "restore", snap, "--output", str(out)]
                else:
                    cmd = [str(BIN / "litestream"), "restore", "-config", str(ls_cfg), "-o",
                           str(out), str(db)]
                run_env = {**env, "PYTHONPATH": a.baseline} if name == "baseline" else env
                results[name].append(measure(cmd, run_env))
        floor = statistics.median(t for t, _, _ in results["floor"])
        print(f"database {db_mb:.1f} MB, {a.rows} rows; snapshot {snap}")
        # CPU seconds move far less with the machine's load than wall time does.
        print("| restore | median s | runs s | x floor | median CPU s | peak RSS MB |")
        print("|---|---|---|---|---|---|")
        for name, runs in results.items():
            med = statistics.median(t for t, _, _ in runs)
            print(f"| {name} | {med:.2f} | {' / '.join(f'{t:.2f}' for t, _, _ in runs)} | "
                  f"{med / floor:.2f} | {statistics.median(c for _, _, c in runs):.2f} | "
                  f"{max(r for _, r, _ in runs):.0f} |")
        hl = results["harmonylite"]
        ratio = statistics.median(t for t, _, _ in hl) / floor
        print(f"RESULT snapshot_restore seconds={statistics.median(t for t, _, _ in hl):.2f} "
              f"floor_s={floor:.2f} ratio={ratio:.2f} rss_mb={max(r for _, r, _ in hl):.0f} "
              f"db_mb={db_mb:.0f} target<=1.0 {'PASS' if ratio <= 1.0 else 'FAIL'}")
    finally:
        s3.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
