"""Run the benchmark set and print the one current table that bench/README.md starts with.

Each script runs as its own process and ends with a ``RESULT`` line; this collects them into
one Markdown table: figure, floor measured in the same run, ratio, target, met or not, date and
the load average (this 2-core machine is shared: say how busy it was).

``--only NAME[,NAME…]`` runs a subset (app_cost, throughput, bulk_catchup, lag, restore, save);
``--quick`` uses fewer rounds and a smaller database for the snapshot figures.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPTS: dict[str, tuple[list[str], list[str]]] = {  # name -> (full args, quick args)
    "app_cost": (["app_cost.py", "--rounds", "3"], ["app_cost.py", "--rounds", "1"]),
    "throughput": (["replication_throughput.py"], ["replication_throughput.py"]),
    "bulk_catchup": (["bulk_catchup.py"], ["bulk_catchup.py"]),
    "lag": (["replication_lag.py", "--rate", "1000"], ["replication_lag.py", "--rate", "1000"]),
    "restore": (["snapshot_restore.py"], ["snapshot_restore.py", "--rounds", "1"]),
    "save": (["snapshot_s3.py", "--no-litestream"],
             ["snapshot_s3.py", "--no-litestream", "--rounds", "1"]),
}


def _fields(line: str) -> dict[str, str]:
    return dict(re.findall(r"(\w+)=([^\s;,)]+)", line))


def _num(v: str) -> float:
    return float(v.lstrip("x").replace(",", ""))


def rows_of(name: str, results: list[str]) -> list[tuple[str, str, str, str, str]]:
    """(figure, floor, ratio, target, met) rows from a script's RESULT lines."""
    out = []
    for line in results:
        f = _fields(line)
        kind = line.split()[1]
        if kind == "app_cost":
            flat = _num(f["flat_out"])
            paced = _num(f["paced"])
            out.append(("application's single-row inserts with its node replicating, flat out",
                        "same inserts without harmonylite", f"x{flat:.2f}", ">= x0.60 (goal 0.80)",
                        "met" if flat >= 0.6 else "NOT met"))
            out.append((f"the same at {f['paced_rate']}/s (mean time per insert)",
                        "same inserts without harmonylite", f"x{paced:.2f}", ">= x0.60",
                        "met" if paced >= 0.6 else "NOT met"))
        elif kind == "replication_throughput":
            rate, floor = _num(f["rows_per_s"]), _num(f["floor"])
            out.append(("20,000 rows in 100-row transactions, node 1 -> node 2",
                        f"raw JetStream publish {floor:,.0f} msg/s", f"{rate:,.0f} rows/s "
                        f"(x{rate / floor:.2f})", ">= 40,000 rows/s",
                        "met" if rate >= 40_000 else "NOT met"))
        elif kind in ("bulk", "catch_up"):
            rate, floor = _num(f["rows_per_s"]), _num(f["floor"])
            what = ("bulk load, one 200,000-row transaction" if kind == "bulk" else
                    "catch-up of a node stopped during 200,000 rows")
            out.append((what, f"raw JetStream publish {floor:,.0f} msg/s",
                        f"{rate:,.0f} rows/s (x{rate / floor:.2f})", ">= 50,000 rows/s",
                        "met" if rate >= 50_000 else "NOT met"))
        elif kind == "replication_lag":
            p99 = _num(f["p99_ms"])
            out.append((f"write -> visible on node 2 at {f['rate']}/s, p99 (p50 {f['p50_ms']} ms)",
                        f"core NATS p99 {f['floor_p99_ms']} ms", f"{p99:.1f} ms",
                        "<= 25 ms (goal 10)", "met" if p99 <= 25 else "NOT met"))
        elif kind in ("snapshot_restore", "snapshot_save"):
            ratio, rss = _num(f["ratio"]), _num(f["rss_mb"])
            floor = ("download + copy" if kind == "snapshot_restore"
                     else "VACUUM INTO + raw upload")
            what = "restore --output from S3" if kind == "snapshot_restore" else "save to S3"
            out.append((f"{what}, {f['db_mb']} MB db ({f['seconds']} s)",
                        f"{floor} {f['floor_s']} s", f"x{ratio:.2f}", "<= x1.0",
                        "met" if ratio <= 1.0 else "NOT met"))
            out.append((f"peak RSS of that {kind.split('_')[1]} ({f['db_mb']} MB db)", "-",
                        f"{rss:.0f} MB", "< 150 MB (1 GB db)",
                        "met" if rss < 150 else "NOT met"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(SCRIPTS)
    table: list[tuple[str, str, str, str, str, str, str]] = []
    for name in names:
        full, quick = SCRIPTS[name]
        cmd = [sys.executable, str(HERE / (quick if args.quick else full)[0]),
               *(quick if args.quick else full)[1:]]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        before = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout[-3000:])
        if proc.returncode:
            sys.stdout.write(proc.stderr[-3000:])
        results = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        after = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
        if not results:
            table.append((name, "-", "no result (the script failed)", "-", "NOT measured", date,
                          f"{before} -> {after}"))
            continue
        for row in rows_of(name, results):
            table.append((*row, date, f"{before} -> {after}"))
    print()
    print("| figure | floor in the same run | result | target | met | date (UTC) "
          "| load average (1/5/15 min, before -> after) |")
    print("|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
