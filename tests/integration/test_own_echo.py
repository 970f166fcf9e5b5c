"""A node's own change coming back from the stream never steps its row back past a newer local
change of the same row.

Real node processes and a real nats-server: node 1's application increments one row as fast as
it can (``UPDATE … SET bal = bal + ?``, autocommit, WAL) while node 1 applies its own earlier
changes coming back. If an echo of an older change overwrote the row between two increments,
the next increment would build on the older value and an increment would be lost for good.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nodes import NodeProc, wait_until
from servers import NatsServer

INCREMENTS = 3000
PACE = 0.004  # seconds, at most, between two increments


@pytest.fixture(params=[5000, 100], ids=["prune-5s", "prune-100ms"])
def pair(request: pytest.FixtureRequest, tmp_path: Path,
         nats_server: NatsServer) -> Iterator[tuple[NodeProc, NodeProc]]:
    # A short cleanup interval prunes published changes while their echoes are still on the
    # way: the protection must not depend on the change log keeping them by chance.
    nodes = []
    for i in (1, 2):
        cfg: dict[str, Any] = {"nats": {"urls": [nats_server.url]},
                               "cleanup_interval": int(request.param)}
        node = NodeProc(tmp_path / f"node{i}", i, cfg)
        node.execute("CREATE TABLE acct(id INTEGER PRIMARY KEY, bal INTEGER NOT NULL)")
        nodes.append(node.start())
    yield nodes[0], nodes[1]
    for node in nodes:
        node.stop()


def test_read_modify_write_loses_no_increment_to_own_echoes(
        pair: tuple[NodeProc, NodeProc]) -> None:
    a, b = pair
    a.execute("INSERT INTO acct VALUES (1, 0)")
    wait_until(lambda: b.query("SELECT bal FROM acct WHERE id = 1") == [(0,)], 60,
               "the row on node 2")
    rng = random.Random(3)
    conn = sqlite3.connect(a.db, isolation_level=None, timeout=60)
    conn.execute("PRAGMA journal_mode=WAL")
    total = 0
    try:
        for _ in range(INCREMENTS):
            step = rng.randint(1, 9)
            conn.execute("UPDATE acct SET bal = bal + ? WHERE id = 1", (step,))
            total += step
            # A varying pace (not synchronisation): some increments go out in a batch of
            # their own, so an echo can come back between two of them.
            time.sleep(rng.random() * PACE)
    finally:
        conn.close()

    def both_settled() -> bool:
        return a.query("SELECT bal FROM acct WHERE id = 1") == [(total,)] == \
            b.query("SELECT bal FROM acct WHERE id = 1")

    try:
        wait_until(both_settled, 60, "both nodes to hold the sum of the increments")
    except AssertionError:
        here = a.query("SELECT bal FROM acct WHERE id = 1")
        there = b.query("SELECT bal FROM acct WHERE id = 1")
        raise AssertionError(f"node 1 committed increments summing to {total}; node 1 holds "
                             f"{here}, node 2 holds {there}") from None
