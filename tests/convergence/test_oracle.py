"""The oracle judged on constructed end states (real SQLite files, no node processes): a node left
behind by the streams passes only when it says so and nothing else is lost; a silent one fails."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from . import gaps, oracle, schema
from .workload import History

STREAM = "harmonylite-changes-c-1"
T_GAP = 1_700_000_000.0  # when node 3 reported its gap


class Scene:
    """Three nodes' databases and the history of what was committed where."""

    def __init__(self, tmp_path: Path, n: int = 3) -> None:
        self.dbs = [tmp_path / f"node{i + 1}.db" for i in range(n)]
        for db in self.dbs:
            conn = sqlite3.connect(db)
            schema.create_schema(conn, frozenset({"basic"}))
            conn.commit()
            conn.close()
        self.history = History()

    def write(self, writer: int, sql: str, params: tuple[object, ...], key: int,
              on: tuple[int, ...], at: float) -> None:
        """``sql`` committed on node ``writer`` at ``at`` (a row of ``kv``), applied on the
        nodes ``on`` (1-based; the writer is always among them)."""
        for i in sorted({writer, *on}):
            conn = sqlite3.connect(self.dbs[i - 1])
            conn.execute(sql, params)
            conn.commit()
            conn.close()
        conn = sqlite3.connect(self.dbs[writer - 1])
        row = conn.execute(f"SELECT {schema.select_exact(('id', 'v', 'n', 't'))} FROM kv "
                           "WHERE id = ?", (key,)).fetchone()
        conn.close()
        image = schema.encode_row(row) if row is not None else None
        self.history.record(writer, [(("kv", (f"integer:{key}",)), image)], at)

    def judge(self, reports: list[gaps.GapReport], snapshots: bool = False
              ) -> tuple[set[str], list[oracle.Failure], list[str]]:
        notes: list[str] = []
        failures = oracle.check_all([oracle.dump(db) for db in self.dbs], [0] * len(self.dbs),
                                    self.history, [], set(), reports, snapshots, notes)
        return {f.invariant for f in failures}, failures, notes


def node3_missed_writes(tmp_path: Path) -> Scene:
    """Rows 1..3 written while node 3 was down, then dropped by the stream: only nodes 1 and 2
    have them. Rows 10..12 are written after node 3 reported its gap: everyone has them."""
    s = Scene(tmp_path)
    everyone = (1, 2, 3)
    s.write(1, "INSERT INTO kv VALUES (5, 'before', 1, 't')", (), 5, everyone, T_GAP - 60)
    for k in (1, 2, 3):
        s.write(1 + k % 2, "INSERT INTO kv VALUES (?, 'lost', ?, 'x')", (k, k), k, (1, 2),
                T_GAP - 20 + k)
    s.write(2, "UPDATE kv SET v = 'changed' WHERE id = 5", (), 5, (1, 2), T_GAP - 10)
    for k in (10, 11, 12):
        s.write(k % 3 + 1, "INSERT INTO kv VALUES (?, 'after', ?, 'y')", (k, k), k, everyone,
                T_GAP + k)
    return s


def report(node: int, *, recorded: bool = True, logged: bool = True, code: int | None = 503,
           names: bool = True, down: bool = False) -> gaps.GapReport:
    reason = f"stream {STREAM} dropped messages 4..40 before this node applied them: restore " \
             "it from a snapshot that covers them"
    return gaps.GapReport(node, {STREAM: (4, 40)} if recorded else {},
                          {STREAM: T_GAP} if logged else {}, code,
                          [reason] if names else ["NATS is disconnected"], down)


def quiet(node: int, down: bool = False) -> gaps.GapReport:
    return gaps.GapReport(node, {}, {}, 200, [], down)


def test_a_silent_divergence_fails(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    found, failures, _ = s.judge([quiet(1), quiet(2), quiet(3, down=True)])
    assert {"identical", "no-lost-write", "gap-reported"} <= found
    silent = next(f for f in failures if f.invariant == "gap-reported")
    assert "node 3 was down across a roll-over" in silent.details[0]


def test_a_reported_gap_passes(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    _, failures, notes = s.judge([quiet(1), quiet(2), report(3, down=True)])
    assert failures == [], oracle.report(failures, 0, "-")
    assert len(notes) == 1 and notes[0].startswith("node 3 reports a gap")
    assert "4 rows differ" in notes[0] and "3 rows written after it match" in notes[0]


def test_a_gap_reported_by_a_node_the_harness_did_not_stop_passes(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    _, failures, _ = s.judge([quiet(1), quiet(2), report(3, down=False)])
    assert failures == []


@pytest.mark.parametrize(("what", "kwargs", "says"), [
    ("health 200", {"code": 200}, "health 200"),
    ("health silent on the gap", {"names": False}, "health does not name the gap"),
    ("gap not recorded", {"recorded": False}, "not recorded in its database"),
    ("gap not logged", {"logged": False}, "never logged"),
    ("health unreachable", {"code": None}, "health None"),
])
def test_a_gap_not_reported_as_promised_fails(tmp_path: Path, what: str,
                                              kwargs: dict[str, object], says: str) -> None:
    s = node3_missed_writes(tmp_path)
    found, failures, _ = s.judge([quiet(1), quiet(2), report(3, **kwargs)])  # type: ignore[arg-type]
    assert "gap-reported" in found, what
    assert any(says in d for f in failures for d in f.details), failures


def test_a_row_written_after_the_gap_that_differs_fails(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    s.write(1, "UPDATE kv SET v = 'late' WHERE id = 11", (), 11, (1, 2), T_GAP + 30)
    found, failures, _ = s.judge([quiet(1), quiet(2), report(3)])
    assert found == {"gap-explained"}, oracle.report(failures, 0, "-")
    assert "kv key ['integer:11']" in failures[0].details[0], failures[0].details
    assert "here (id=integer:11, v='after'" in failures[0].details[0]
    assert "on the others (id=integer:11, v='late'" in failures[0].details[0]


def test_a_delete_after_the_gap_missing_on_the_lagging_node_fails(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    s.write(2, "DELETE FROM kv WHERE id = 10", (), 10, (1, 2), T_GAP + 31)
    found, _, _ = s.judge([quiet(1), quiet(2), report(3)])
    assert found == {"gap-explained"}


def test_a_value_nobody_wrote_on_the_lagging_node_fails(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    conn = sqlite3.connect(s.dbs[2])
    conn.execute("UPDATE kv SET v = 'invented' WHERE id = 5")
    conn.execute("INSERT INTO kv VALUES (99, 'ghost', 0, 'z')")
    conn.commit()
    conn.close()
    found, _, _ = s.judge([quiet(1), quiet(2), report(3)])
    assert {"no-lost-write", "no-invented-row"} <= found


def test_a_write_lost_by_another_node_fails_beside_a_reported_gap(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    s.write(1, "INSERT INTO kv VALUES (20, 'only on 1', 0, 'z')", (), 20, (1,), T_GAP - 5)
    found, _, _ = s.judge([quiet(1), quiet(2), report(3)])
    assert {"identical", "no-lost-write"} <= found


def test_with_snapshots_on_a_gap_excuses_nothing(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    found, _, notes = s.judge([quiet(1), quiet(2), report(3)], snapshots=True)
    assert {"identical", "no-lost-write"} <= found and notes == []


def test_every_node_behind_a_gap_fails(tmp_path: Path) -> None:
    s = node3_missed_writes(tmp_path)
    found, _, _ = s.judge([report(1), report(2), report(3)])
    assert "gap-explained" in found


def test_the_nodes_own_gap_lines_are_read() -> None:
    # Lines as a node writes them (replication/consumer.py, node/progress.py, restore/at_start.py).
    log = "\n".join([
        "16:06:36.211 INFO [node 3] change capture installed tables=3",
        "16:06:36.232 ERRO [node 3] this node never applied messages 25..108 of stream "
        "harmonylite-changes-c-1 (the stream dropped them): it may differ from the other nodes",
        "16:06:36.251 ERRO [node 3] gap in stream harmonylite-changes-c-2: messages 38..195 were "
        "dropped by the stream before this node applied them stream=harmonylite-changes-c-2",
        "16:06:37.500 ERRO [node 3] messages 3..9 of stream harmonylite-changes-c-1 are gone from "
        "the stream and lost to this node (no snapshot covers them); a newer snapshot is needed",
    ])
    near = gaps._epoch("16:06:30.000", T_GAP)
    found = gaps.logged_gaps(log, near)
    assert set(found) == {"harmonylite-changes-c-1", "harmonylite-changes-c-2"}
    assert found["harmonylite-changes-c-1"] == pytest.approx(near + 7.5)
    assert found["harmonylite-changes-c-2"] == pytest.approx(near + 6.251)
