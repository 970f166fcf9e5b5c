"""Seeded convergence runs: real node processes, real nats-server, real SQLite files.

``CI_SEEDS`` run in the normal suite: a few that passed from the start, and the regression
seeds of the bug classes the checker found (see FINDINGS.md), all fixed since. ``MORE_SEEDS``
are further regression seeds, run with ``HARMONYLITE_CONVERGENCE_ALL=1``. ``BUG_SEEDS`` are
expected to fail (a known limit), and run only when asked for:
``HARMONYLITE_CONVERGENCE_BUGS=1 pytest tests/convergence`` or ``-m convergence_known_bug``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import oracle, profiles
from .harness import DiskFaultUnavailable, Harness

pytestmark = [pytest.mark.convergence, pytest.mark.timeout(400)]

# (profile, seed, seconds of writes): run in CI. The first ones pass since the checker was
# written; the others are the regression seeds of the bug classes it found (FINDINGS.md), fixed
# since: each failed on the code as it was.
CI_SEEDS = [
    ("basic", 1, 8.0),
    ("values", 11, 8.0),        # issue 10: text that is not UTF-8
    ("faults_stop", 11, 8.0),
    ("unique", 8, 6.0),         # issue 11: the same UNIQUE value on two nodes at once
    ("replace", 5, 8.0),        # issue 11: INSERT OR REPLACE displacing a row
    ("triggers", 5, 8.0),       # issue 11: application triggers firing on replicas
    ("nopk_vacuum", 5, 8.0),    # issue 11: VACUUM on a table without a primary key
    ("schema", 5, 8.0),         # issue 12: rolling schema changes online
    ("rollover_snap", 11, 12.0),  # issues 10/13: a node down across a roll-over restores
    ("rollover", 11, 12.0),     # issues 10/13: the same without snapshots: it says so (gap)
    ("all", 3, 12.0),           # everything at once (NOCASE keys, key changes, faults)
    ("restore", 11, 12.0),      # issue 13: an operator's forced restore of a running node
    ("disk", 1, 12.0),          # a full disk; found 0 kept where -0.0 was sent (root only)
    ("cluster", 11, 14.0),      # issue 15: 3 clustered servers, R3, a node's server killed
    ("framework", 11, 14.0),    # issue 16: per-node bookkeeping, rows every migrate creates
    ("fts", 1, 12.0),           # an FTS5 index kept by application triggers, a new node
    ("clone", 1, 6.0),          # a node started from a copy of another's database
    ("shards_down", 1, 6.0),    # the shard count lowered with every node stopped
    ("idle", 1, 10.0),          # idle longer than the health limit: a follower said 503
]

# Regression seeds of fixed bug classes kept out of CI for time; run with
# HARMONYLITE_CONVERGENCE_ALL=1 (scripts/soak.sh covers the same profiles with new seeds).
MORE_SEEDS = [
    ("basic", 2, 8.0),
    ("fk", 11, 8.0),
    ("nocase", 8, 8.0),         # issue 11: a NOCASE key in two cases
    ("nopk", 11, 8.0),          # issue 11: rowid collisions in a table without a primary key
    ("huge", 11, 8.0),          # issue 10: a value over the payload limit
    ("lock", 11, 8.0),          # issue 10: a long application lock
    ("schema_restart", 11, 8.0),  # issue 12: the stop-alter-restart procedure
    ("provision", 11, 12.0),    # issue 13: a brand-new node provisioned mid-run
    ("clock", 11, 12.0),        # issue 13: a node clock 10 minutes fast, keep = 2
    ("all", 4, 12.0),
    ("all", 5, 12.0),
    ("disk", 2, 12.0),
    ("restore", 1, 12.0),
    ("archive", 1, 12.0),       # point-in-time restore from the archive equals the nodes
    ("cluster", 1, 14.0),
    ("framework", 5, 14.0),
    ("all", 4224, 20.0),        # a row of a table without a primary key written as it was
    ("schema_restart", 4237, 14.0),  # slow restarts: the rollout finishes after the writes
    ("shards_up", 1, 6.0),      # the shard count raised with every node stopped
    ("clone", 2, 10.0),
    ("idle", 2, 12.0),
    ("ddl", 1, 14.0),           # replicated schema changes: each migration run on one node
    ("ddl_provision", 1, 14.0),  # ... and a new node from a snapshot taken before some
    ("ddl_shards", 2, 14.0),    # ... with 4 shards (schema changes on the first only)
]

# (profile, seed, seconds, issue, bug class): still failing, expected to until fixed.
BUG_SEEDS: list[tuple[str, int, float, int, str]] = [
    ("ddl", 16659, 14.0, 23, "a row written under the old schema lost beside a table rebuild"),
    ("ddl_provision", 17855, 14.0, 23, "a column value differs after replicated schema changes"),
]


def _run(tmp_path: Path, profile: str, seed: int, seconds: float) -> None:
    h = Harness(tmp_path, profiles.get(profile), seed)
    try:
        try:
            h.start()
        except DiskFaultUnavailable as exc:
            pytest.skip(str(exc))
        r = h.run(seconds)
    finally:
        h.close()
    assert r.ok, "\n" + oracle.report(r.failures, r.seed, r.replay)


@pytest.mark.parametrize(("profile", "seed", "seconds"), CI_SEEDS,
                         ids=[f"{p}-{s}" for p, s, _ in CI_SEEDS])
def test_seed_converges(tmp_path: Path, profile: str, seed: int, seconds: float) -> None:
    _run(tmp_path, profile, seed, seconds)


_BUGS_ON = os.environ.get("HARMONYLITE_CONVERGENCE_BUGS") == "1"
_ALL_ON = os.environ.get("HARMONYLITE_CONVERGENCE_ALL") == "1"


@pytest.mark.parametrize(("profile", "seed", "seconds"), MORE_SEEDS,
                         ids=[f"{p}-{s}" for p, s, _ in MORE_SEEDS])
def test_more_seeds_converge(tmp_path: Path, profile: str, seed: int, seconds: float) -> None:
    if not _ALL_ON:
        pytest.skip("more regression seeds: set HARMONYLITE_CONVERGENCE_ALL=1 to run")
    _run(tmp_path, profile, seed, seconds)


@pytest.mark.parametrize(
    ("profile", "seed", "seconds"),
    [pytest.param(p, s, sec, id=f"{p}-{s}", marks=[
        pytest.mark.convergence_known_bug,
        pytest.mark.xfail(reason=f"issue {issue}: {what}", strict=False),
    ]) for p, s, sec, issue, what in BUG_SEEDS],
)
def test_known_bug_seed(request: pytest.FixtureRequest, tmp_path: Path, profile: str,
                        seed: int, seconds: float) -> None:
    selected = "convergence_known_bug" in (request.config.getoption("-m") or "")
    if not (_BUGS_ON or selected):
        pytest.skip("known-bug seed: set HARMONYLITE_CONVERGENCE_BUGS=1 to run")
    _run(tmp_path, profile, seed, seconds)
