"""Seeded convergence runs: real node processes, real nats-server, real SQLite files.

The ``CI_SEEDS`` pass on today's code and run in the normal suite (about 70 s in all).
``BUG_SEEDS`` are the regression cases of the bug classes the checker found (see FINDINGS.md);
they are expected to fail until their issue is fixed, and run only when asked for:
``HARMONYLITE_CONVERGENCE_BUGS=1 pytest tests/convergence`` or ``-m convergence_known_bug``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import oracle, profiles
from .harness import Harness

pytestmark = [pytest.mark.convergence, pytest.mark.timeout(400)]

# (profile, seed, seconds of writes)
CI_SEEDS = [
    ("basic", 1, 8.0),
    ("basic", 2, 8.0),
    ("values", 11, 8.0),
    ("fk", 11, 8.0),
    ("faults_stop", 11, 8.0),
]

# (profile, seed, seconds, issue, bug class)
BUG_SEEDS = [
    ("unique", 8, 6.0, 11, "concurrent inserts of the same UNIQUE value diverge"),
    ("replace", 5, 8.0, 11, "INSERT OR REPLACE displacing a row diverges"),
    ("triggers", 5, 8.0, 11, "application triggers fire again on replicas"),
    ("nocase", 8, 8.0, 11, "a NOCASE key written in two cases diverges"),
    ("nopk_vacuum", 5, 8.0, 11, "VACUUM renumbers rowids of a table without a primary key"),
    ("schema", 5, 8.0, 12, "online schema changes are not followed"),
    ("nopk", 11, 8.0, 11, "rowid collisions in a table without a primary key"),
    ("values", 11, 8.0, 10, "non-UTF-8 text stalls publishing (passes since the fix)"),
    ("huge", 11, 8.0, 10, "a value over the payload limit stalls publishing"),
    ("lock", 11, 8.0, 10, "a long application lock drops incoming changes"),
    ("rollover", 11, 8.0, 13, "a node down across a stream roll-over never converges"),
]


def _run(tmp_path: Path, profile: str, seed: int, seconds: float) -> None:
    h = Harness(tmp_path, profiles.get(profile), seed)
    try:
        h.start()
        r = h.run(seconds)
    finally:
        h.close()
    assert r.ok, "\n" + oracle.report(r.failures, r.seed, r.replay)


@pytest.mark.parametrize(("profile", "seed", "seconds"), CI_SEEDS,
                         ids=[f"{p}-{s}" for p, s, _ in CI_SEEDS])
def test_seed_converges(tmp_path: Path, profile: str, seed: int, seconds: float) -> None:
    _run(tmp_path, profile, seed, seconds)


_BUGS_ON = os.environ.get("HARMONYLITE_CONVERGENCE_BUGS") == "1"


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
