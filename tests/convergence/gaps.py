"""Judging a node that the streams left behind: what the product promises when it cannot converge.

With snapshots off, a node that was down (or stopped) while a stream rolled over past what it had
applied cannot converge: nothing holds the messages the stream dropped. The promise is that such
a node SAYS so, and that nothing else is lost:

- ``gap-reported``: the node logs the gap (``gap in stream S: messages a..b``, ``this node never
  applied messages a..b of stream S`` or ``messages a..b of stream S are gone from the stream``),
  records it in its database (``gap:S`` in ``__harmonylite__state``), and its health is 503 with
  a reason naming every stream with a gap. A node that differs from the others without saying so
  fails the round as before (``identical``), and this invariant says it was silent.
- ``gap-explained``: what the node holds is explained by the gap and nothing else:
  * every row it holds is a committed image of that row, with no duplicate (the same rules as
    every node: ``no-lost-write`` without the rows the gap took, ``no-invented-row``,
    ``no-duplicate``);
  * every row written (by any node) after the node last reported a gap ends exactly as on the
    other nodes. A write committed after that moment reaches the stream after it, so the node
    applied it and every later change of that row, in the same stream order as the others: the
    row's final state cannot depend on the messages the gap took.
  The other nodes are judged by every invariant as before, among themselves.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from . import schema
from .workload import History

Dump = dict[str, tuple[tuple[str, ...], list[tuple[str, ...]]]]

# The node's own words for a gap (replication/consumer.py, node/progress.py, restore/at_start.py).
_GAP_LINE = re.compile(
    r"^(?P<t>\d\d:\d\d:\d\d\.\d{3}) \S+ .*?(?:"
    r"gap in stream (?P<s1>\S+): messages \d+\.\.\d+ were dropped"
    r"|never applied messages \d+\.\.\d+ of stream (?P<s2>\S+) "
    r"|messages \d+\.\.\d+ of stream (?P<s3>\S+) are gone from the stream)")
# A log line's time has millisecond precision; a write must come later than this after it.
MARGIN_S = 0.01


@dataclass
class GapReport:
    """What one node says about gaps once the cluster is quiet."""

    node: int  # 1-based
    recorded: dict[str, tuple[int, int]] = field(default_factory=dict)  # from its database
    logged: dict[str, float] = field(default_factory=dict)  # stream -> last log line's time
    health_code: int | None = None
    health_reasons: list[str] = field(default_factory=list)
    down_across_rollover: bool = False  # the harness took it down while the streams rolled

    @property
    def reported(self) -> bool:
        return bool(self.recorded or self.logged)

    @property
    def since(self) -> float | None:
        """The last moment the node reported a gap (writes after it reached it in full)."""
        return max(self.logged.values()) if self.logged else None


def recorded_gaps(db: Path) -> dict[str, tuple[int, int]]:
    """The gaps the node recorded in its database (``gap:<stream>`` = ``first-last``)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
    try:
        rows = conn.execute("SELECT k, v FROM __harmonylite__state WHERE k LIKE 'gap:%'")
        out = {}
        for k, v in rows.fetchall():
            first, _, last = str(v).partition("-")
            out[str(k)[4:]] = (int(first), int(last.rsplit("-", 1)[-1]))
        return out
    except sqlite3.OperationalError:  # no change capture installed yet: nothing recorded
        return {}
    finally:
        conn.close()


def _epoch(clock: str, near: float) -> float:
    """The local time of day ``clock`` (HH:MM:SS.mmm) on the day that puts it nearest ``near``."""
    of_day = datetime.strptime(clock, "%H:%M:%S.%f").time()
    ref = datetime.fromtimestamp(near)
    cands = [datetime.combine(ref.date() + timedelta(days=d), of_day) for d in (-1, 0, 1)]
    return min((c.timestamp() for c in cands), key=lambda ts: abs(ts - near))


def logged_gaps(log_text: str, near: float) -> dict[str, float]:
    """stream -> the time of the last log line reporting a gap in it."""
    out: dict[str, float] = {}
    for line in log_text.splitlines():
        m = _GAP_LINE.match(line)
        if m is None:
            continue
        stream = m["s1"] or m["s2"] or m["s3"]
        out[stream] = max(out.get(stream, 0.0), _epoch(m["t"], near))
    return out


def health(url: str, timeout: float = 10.0) -> tuple[int | None, list[str]]:
    """(status code, reasons) of a node's detailed health; (None, [why]) when it does not
    answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            code, body = int(r.status), r.read()
    except urllib.error.HTTPError as exc:
        code, body = int(exc.code), exc.read()
    except OSError as exc:
        return None, [f"health did not answer: {exc}"]
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return code, [body.decode(errors="replace")]
    return code, [str(r) for r in doc.get("reasons") or ()]


def collect(node: int, db: Path, log_text: str, health_url: str | None,
            down_across_rollover: bool, near: float | None = None) -> GapReport:
    code, reasons = health(health_url) if health_url else (None, ["no health endpoint"])
    return GapReport(node, recorded_gaps(db), logged_gaps(log_text, near or time.time()),
                     code, reasons, down_across_rollover)


def reporting_failures(r: GapReport) -> list[str]:
    """Why a node with a gap does not report it the way the product promises (empty if it
    does)."""
    out = []
    streams = sorted(set(r.recorded) | set(r.logged))
    for s in streams:
        if s not in r.logged:
            out.append(f"node {r.node}: gap in {s} recorded {r.recorded[s]} but never logged")
        if s not in r.recorded:
            out.append(f"node {r.node}: gap in {s} logged but not recorded in its database "
                       "(a restart forgets it)")
        if not any(s in reason for reason in r.health_reasons):
            out.append(f"node {r.node}: health does not name the gap in {s}; reasons: "
                       f"{r.health_reasons}")
    if streams and r.health_code != 503:
        out.append(f"node {r.node}: health {r.health_code} with a gap in {', '.join(streams)} "
                   "(expected 503)")
    return out


def _by_key(d: Dump, t: schema.Table) -> dict[tuple[str, ...], list[tuple[str, ...]]] | None:
    if t.name not in d:
        return None
    cols, rows = d[t.name]
    if not all(c in cols for c in t.key):
        return None
    kidx = [cols.index(c) for c in t.key]
    out: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
    for row in rows:
        out.setdefault(schema.fold_key(tuple(row[i] for i in kidx), t.nocase_key),
                       []).append(row)
    return out


def after_gap_differences(lagging: Dump, cluster: Dump, history: History, since: float
                          ) -> list[str]:
    """Rows written after ``since`` (by any node) that end differently on the lagging node.

    Tables with a primary key only: a table without one has no row identity to follow."""
    out = []
    for t in schema.TABLES:
        if not t.has_pk or t.name not in cluster:
            continue
        if t.name not in lagging or lagging[t.name][0] != cluster[t.name][0]:
            out.append(f"table {t.name}: columns {list(lagging.get(t.name, ((), []))[0])} "
                       f"on the lagging node, {list(cluster[t.name][0])} on the others")
            continue
        mine, theirs = _by_key(lagging, t), _by_key(cluster, t)
        if mine is None or theirs is None:
            continue
        for (tname, k), at in history.last_write_at.items():
            if tname != t.name or at <= since + MARGIN_S:
                continue
            a, b = sorted(mine.get(k, [])), sorted(theirs.get(k, []))
            if a != b:
                cols = cluster[t.name][0]
                out.append(f"{t.name} key {[schema.pretty(v) for v in k]} written "
                           f"{at - since:.2f}s after the gap was reported: here "
                           f"{_rows(a, cols)}, on the others {_rows(b, cols)}")
    return out


def _rows(rows: list[tuple[str, ...]], cols: tuple[str, ...]) -> str:
    if not rows:
        return "no row"
    return "; ".join("(" + ", ".join(f"{c}={schema.pretty(v)}" for c, v in zip(cols, r,
                                                                          strict=False)) + ")"
                     for r in rows)


def differing_rows(a: Dump, b: Dump) -> int:
    """How many rows differ between the two dumps: keys whose rows differ (tables with a
    primary key), rows not in both (the others)."""
    n = 0
    for name in sorted(set(a) | set(b)):
        t = next((t for t in schema.TABLES if t.name == name and t.has_pk), None)
        mine = _by_key(a, t) if t is not None else None
        theirs = _by_key(b, t) if t is not None else None
        if mine is None or theirs is None:
            ra = Counter(a.get(name, ((), []))[1])
            rb = Counter(b.get(name, ((), []))[1])
            n += sum(((ra - rb) + (rb - ra)).values())
            continue
        n += sum(1 for k in set(mine) | set(theirs)
                 if sorted(mine.get(k, [])) != sorted(theirs.get(k, [])))
    return n
