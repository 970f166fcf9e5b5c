"""Command line: run one or more seeded rounds and print a summary table.

``--minutes`` repeats rounds (seed, seed+1, …) of the profile(s) until the time is spent;
without it one round of ``--seconds`` (the profile's default) runs. Exit 0 when every invariant
held, 1 otherwise (the failing seed, invariant and replay command are printed).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

from . import oracle, profiles
from .harness import Harness, Result


def run_round(seed: int, profile: profiles.Profile, nodes: int, seconds: float,
              embedded: bool, workdir: Path) -> Result:
    h = Harness(workdir, profile, seed, nodes, embedded=embedded)
    try:
        h.start()
        return h.run(seconds)
    finally:
        h.close()


def summary(results: list[Result]) -> str:
    head = (f"{'seed':>8} {'profile':<15} {'nodes':>5} {'txns':>6} {'rows':>6} {'faults':>6} "
            f"{'restores':>8} {'quiesce':>8}  verdict")
    lines = [head, "-" * len(head)]
    for r in results:
        verdict = ("PASS" + (" (a node behind a reported gap)" if r.lagging else "") if r.ok
                   else "FAIL " + ",".join(sorted({f.invariant for f in r.failures})))
        lines.append(f"{r.seed:>8} {r.profile:<15} {r.nodes:>5} {r.counts.get('committed', 0):>6} "
                     f"{r.rows:>6} {len(r.faults):>6} {r.counts.get('restores', 0):>8} "
                     f"{r.quiesce_seconds:>7.1f}s  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.convergence")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--profile", default="basic",
                    help="a profile name, a comma list, or 'every' (all in turn); "
                    f"known: {', '.join(profiles.PROFILES)}")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=None, help="write phase of one round")
    ap.add_argument("--minutes", type=float, default=None, help="keep running rounds this long")
    ap.add_argument("--embedded", action="store_true", help="embedded clustered NATS servers")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--verbose", "-v", action="store_true", help="print faults and counters")
    ap.add_argument("--src", type=Path, default=None,
                    help="run the nodes from this source tree (e.g. a git worktree's src/)")
    args = ap.parse_args(argv)
    if args.src is not None:  # node processes import harmonylite from there
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(args.src.resolve()), os.environ.get("PYTHONPATH", "")) if p)
    seed = args.seed if args.seed is not None else int(time.time()) % 100000
    names = list(profiles.PROFILES) if args.profile == "every" else args.profile.split(",")
    chosen = [profiles.get(n) for n in names]
    end = time.monotonic() + args.minutes * 60 if args.minutes else None
    results: list[Result] = []
    round_ = 0
    while True:
        profile = chosen[round_ % len(chosen)]
        seconds = args.seconds or profile.write_seconds
        workdir = Path(tempfile.mkdtemp(prefix=f"convergence-{seed}-"))
        print(f"== round {round_ + 1}: seed {seed}, profile {profile.name}, {args.nodes} nodes, "
              f"{seconds:g}s of writes  ({workdir})", flush=True)
        r = run_round(seed, profile, args.nodes, seconds, args.embedded, workdir)
        if args.src is not None:
            r.replay += f" --src {args.src}"
        results.append(r)
        if args.verbose:
            print("   faults:\n" + "\n".join(f"     {f}" for f in r.faults) if r.faults else
                  "   faults: none")
            print("   counts: " + ", ".join(f"{k}={v}" for k, v in sorted(r.counts.items())))
        for line in r.lagging:
            print(f"   {line}")
        if r.ok:
            print(f"   PASS ({r.rows} rows, converged in {r.quiesce_seconds:.1f}s)")
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(oracle.report(r.failures, r.seed, r.replay))
            for line in r.notes:
                print(f"   {line}")
            print(f"   work directory kept: {workdir}")
        round_ += 1
        seed += 1
        if end is None:
            if round_ >= len(chosen):
                break
            seed -= 1  # one seed over every chosen profile
        elif time.monotonic() >= end:
            break
    print()
    print(summary(results))
    failed = [r for r in results if not r.ok]
    if failed:
        print(f"\nVERDICT: FAIL ({len(failed)} of {len(results)} rounds); first failure: seed "
              f"{failed[0].seed}, invariant {failed[0].failures[0].invariant}")
        print(f"replay: {failed[0].replay}")
        return 1
    print(f"\nVERDICT: PASS ({len(results)} rounds)")
    return 0
