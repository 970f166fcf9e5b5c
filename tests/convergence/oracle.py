"""The oracle: judges the end state after quiescence.

Invariants (each failure names one):
- ``identical``: every node's user tables are identical: same tables, same columns, same rows as
  a multiset, values compared byte-exactly with their storage class (``typeof``/``hex``; reals by
  their exact bits, so -0.0 differs from 0.0).
- ``no-lost-write``: every final row equals some write committed to that row by some node, and a
  row that some node committed is missing only if some node deleted it, or a node recorded it as
  displaced by a UNIQUE conflict (``__harmonylite__conflicts``: removed with a trace).
- ``no-invented-row``: no final row exists that no node ever wrote.
- ``no-duplicate``: no two rows share an identity; in a table without a primary key (a
  multiset: rows have no identity but their content) no content is present more often than it
  was written.
- ``all-published``: every node's change log is fully published (nothing stuck pending).
- ``application-ok``: the application's own statements (migrations) were not broken.
- ``nodes-alive``: no node process died by itself.
- ``derived-index``: every node's full-text index matches its content table and answers MATCH
  like every other node's (profile ``fts``).
- ``gap-reported``, ``gap-explained``: with snapshots off, a node the streams left behind (it
  reports a gap) is judged by what the product promises instead of ``identical`` (see gaps.py);
  the other nodes are judged among themselves by every invariant above.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gaps, schema
from .workload import History

Dump = dict[str, tuple[tuple[str, ...], list[tuple[str, ...]]]]  # table -> (columns, rows)


@dataclass
class Failure:
    invariant: str
    summary: str
    details: list[str] = field(default_factory=list)


def _connect(db: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30, isolation_level=None)
    return conn


def dump(db: Path) -> Dump:
    """Every user table, rows sorted, in one read transaction."""
    conn = _connect(db)
    try:
        conn.execute("BEGIN")
        out: Dump = {}
        for name in schema.user_tables(conn):
            if name in schema.PER_NODE:
                continue
            cols = tuple(schema.columns(conn, name))
            rows = conn.execute(f'SELECT {schema.select_exact(cols)} FROM "{name}"').fetchall()
            out[name] = (cols, sorted(schema.encode_row(r) for r in rows))
        conn.execute("COMMIT")
        return out
    finally:
        conn.close()


def pending(db: Path) -> int:
    """Changes captured but not yet acknowledged by JetStream (0 when the log is absent)."""
    conn = _connect(db)
    try:
        return int(conn.execute(
            "SELECT count(*) FROM __harmonylite__log WHERE id > "
            "(SELECT v FROM __harmonylite__state WHERE k = 'published')").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def visibility(db: Path, log: Path) -> str:
    """Where an operator would see a change that was not applied: dead letters, the log."""
    dead: int | str = 0
    conn = _connect(db)
    try:
        dead = int(conn.execute("SELECT count(*) FROM __harmonylite__dead_letter").fetchone()[0])
    except sqlite3.OperationalError:
        dead = "no table"
    finally:
        conn.close()
    text = log.read_text(errors="replace") if log.exists() else ""
    words = ("skipped", "dead-letter", "dead letter", "gap", "stalled", "Traceback")
    found = {w: text.count(w) for w in words if w in text}
    return f"dead letters: {dead}; log mentions: {found or 'none'}"


def _show(row: tuple[str, ...], cols: tuple[str, ...]) -> str:
    return "(" + ", ".join(f"{c}={schema.pretty(v)}" for c, v in zip(cols, row, strict=False)) + ")"


def check_identical(dumps: list[Dump], numbers: list[int] | None = None) -> list[Failure]:
    """``numbers``: the node number of each dump (1, 2, … when not given)."""
    failures: list[Failure] = []
    if not dumps:
        return failures
    nums = numbers or list(range(1, len(dumps) + 1))
    first = dumps[0]
    names = sorted(set().union(*(d.keys() for d in dumps)))
    for name in names:
        missing = [nums[i] for i, d in enumerate(dumps) if name not in d]
        if missing:
            failures.append(Failure("identical", f"table {name!r} missing on node(s) {missing}"))
            continue
        cols0 = first[name][0]
        for i, d in zip(nums[1:], dumps[1:], strict=True):
            if d[name][0] != cols0:
                failures.append(Failure("identical", f"table {name!r} columns differ: node "
                                        f"{nums[0]} {list(cols0)} vs node {i} "
                                        f"{list(d[name][0])}"))
        if any(d[name][0] != cols0 for d in dumps):
            continue
        counts = [Counter(d[name][1]) for d in dumps]
        if all(c == counts[0] for c in counts[1:]):
            continue
        details = []
        for row in sorted(set().union(*counts)):
            have = [c.get(row, 0) for c in counts]
            if len(set(have)) > 1:
                details.append(f"{_show(row, cols0)} count per node {have}")
        sizes = [len(d[name][1]) for d in dumps]
        failures.append(Failure("identical", f"table {name!r} differs between nodes {nums} "
                                f"(rows per node {sizes}, {len(details)} differing rows)",
                                details))
    return failures


def displaced(db: Path) -> set[tuple[str, tuple[str, ...]]]:
    """(table, key) of the rows this node recorded as displaced by a UNIQUE conflict."""
    from harmonylite.replication.event import loads_values  # the record's own encoding

    conn = _connect(db)
    out: set[tuple[str, tuple[str, ...]]] = set()
    try:
        try:
            found = conn.execute("SELECT tbl, columns, displaced FROM "
                                 "__harmonylite__conflicts").fetchall()
        except sqlite3.OperationalError:
            return out
        keys = {t.name: t for t in schema.TABLES}
        for tbl, cols_json, blob in found:
            t = keys.get(tbl)
            if t is None:
                continue
            import json

            cols = json.loads(cols_json)
            values = loads_values(blob)
            picked = [values[cols.index(c)] for c in t.key]
            # the same exact encoding the dumps use, computed by SQLite itself
            marks = ", ".join(f"CAST(? AS TEXT) AS k{i}" if isinstance(v, bytes)
                              and type(v).__name__ == "RawText" else f"? AS k{i}"
                              for i, v in enumerate(picked))
            exact = schema.select_exact([f"k{i}" for i in range(len(picked))])
            row = conn.execute(f"SELECT {exact} FROM (SELECT {marks})", picked).fetchone()
            out.add((tbl, schema.fold_key(schema.encode_row(row), t.nocase_key)))
    finally:
        conn.close()
    return out


def check_history(d: Dump, history: History, node: int,
                  removed: set[tuple[str, tuple[str, ...]]] | None = None,
                  gone: list[str] | None = None) -> list[Failure]:
    """``gone``: when given (a node with a reported gap), committed rows missing from ``d`` are
    listed there rather than failing ``no-lost-write``; every other rule still holds."""
    lost: list[str] = []
    invented: list[str] = []
    dups: list[str] = []
    for t in schema.TABLES:
        if t.name not in d:
            continue
        cols, rows = d[t.name]
        if not all(c in cols for c in t.key):
            continue
        kidx = [cols.index(c) for c in t.key]
        cidx = [cols.index(c) for c in t.checked] if all(c in cols for c in t.checked) else None
        final: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for r in rows:
            final.setdefault(schema.fold_key(tuple(r[i] for i in kidx), t.nocase_key), []).append(r)
        if t.has_pk:
            for k, rs in final.items():
                if len(rs) > 1:
                    dups.append(f"{t.name} key {[schema.pretty(v) for v in k]}: {len(rs)} rows")
        elif cidx is not None:
            # A table without a primary key is a multiset: rows have no identity beyond their
            # content, so two nodes updating the same row at once both leave their row (no
            # write lost). A duplicate is a content present more often than it was written.
            written = Counter(img for (tname, _), ws in history.writes.items()
                              if tname == t.name for _, img in ws if img is not None)
            present = Counter(tuple(r[i] for i in cidx) for r in rows)
            for content, n in present.items():
                if n > written[content]:
                    dups.append(f"{t.name} row {_show(content, t.checked)}: {n} rows, "
                                f"written {written[content]} times")
        for (tname, k), writes in history.writes.items():
            if tname != t.name:
                continue
            found = final.get(k)
            if found is None:
                if all(img is not None for _, img in writes) and (t.name, k) not in (
                        removed or set()):
                    (lost if gone is None else gone).append(
                        f"{t.name} key {[schema.pretty(v) for v in k]} missing; committed by "
                        f"node(s) {sorted({n for n, _ in writes})}, never deleted")
                continue
            if cidx is None:
                continue
            images = {img for _, img in writes if img is not None}
            for r in found:
                got = tuple(r[i] for i in cidx)
                if got not in images:
                    lost.append(f"{t.name} final row {_show(got, t.checked)} is no committed "
                                f"write to that row ({len(images)} committed images, "
                                f"{sum(img is None for _, img in writes)} deletes)")
        for k in final:
            if (t.name, k) not in history.writes:
                invented.append(f"{t.name} key {[schema.pretty(v) for v in k]} was never "
                                "written by any node")
    out = []
    if lost:
        out.append(Failure("no-lost-write", f"node {node}: {len(lost)} rows hold no committed "
                           "value or vanished", lost))
    if invented:
        out.append(Failure("no-invented-row", f"node {node}: {len(invented)} rows nobody "
                           "wrote", invented))
    if dups:
        out.append(Failure("no-duplicate", f"node {node}: {len(dups)} duplicated rows", dups))
    return out


def lagging(reports: list[gaps.GapReport] | None, snapshots: bool) -> list[int]:
    """0-based indices of the nodes judged by the gap promise: with snapshots off, the nodes
    that report a gap (with snapshots on, a node must restore and converge instead)."""
    if snapshots or not reports:
        return []
    return [i for i, r in enumerate(reports) if r.reported]


def check_all(dumps: list[Dump], pendings: list[int], history: History,
              dead: list[str], removed: set[tuple[str, tuple[str, ...]]] | None = None,
              reports: list[gaps.GapReport] | None = None, snapshots: bool = False,
              notes: list[str] | None = None) -> list[Failure]:
    """Every invariant. ``reports``: what each node says about gaps (see gaps.py); with
    ``snapshots`` off, a node reporting a gap is judged by the gap promise. ``notes`` receives
    one line per such node saying what its gap explains."""
    behind = lagging(reports, snapshots)
    judged = [i for i in range(len(dumps)) if i not in behind]
    failures = check_identical([dumps[i] for i in judged], [i + 1 for i in judged])
    if behind and not judged:
        failures.append(Failure("gap-explained", "every node reports a gap: no node holds the "
                                "cluster's state to judge the others by"))
    seen: set[tuple[str, str]] = set()
    for i, d in enumerate(dumps, start=1):  # judge every node; report each finding once
        gone: list[str] | None = [] if i - 1 in behind else None
        for f in check_history(d, history, i, removed, gone):
            sig = (f.invariant, "\n".join(f.details))
            if sig not in seen:
                seen.add(sig)
                failures.append(f)
    if reports:
        failures += _judge_gaps(dumps, history, reports, behind, judged, notes)
    stuck = [(i + 1, p) for i, p in enumerate(pendings) if p]
    if stuck:
        failures.append(Failure("all-published", "changes never published: " + ", ".join(
            f"node {i}: {p} pending" for i, p in stuck)))
    app = [f"{k} (x{v})" for k, v in history.counts.items() if k.startswith("APP ERROR")]
    if app:
        failures.append(Failure("application-ok", "the application's statements failed", app))
    if dead:
        failures.append(Failure("nodes-alive", "node processes died by themselves", dead))
    return failures


def _judge_gaps(dumps: list[Dump], history: History, reports: list[gaps.GapReport],
                behind: list[int], judged: list[int], notes: list[str] | None) -> list[Failure]:
    failures: list[Failure] = []
    ref = dumps[judged[0]] if judged else None
    # Differing is ``identical``'s finding; this one says the node was silent about it.
    silent = [f"node {reports[i].node} was down across a roll-over and differs from the other "
              f"nodes, but reports no gap (health {reports[i].health_code})"
              for i in judged if reports[i].down_across_rollover
              and any(dumps[i] != dumps[j] for j in judged)]
    told = [w for i in behind for w in gaps.reporting_failures(reports[i])]
    if silent or told:
        failures.append(Failure("gap-reported", "a node left behind by the streams does not "
                                "say so as promised (log, record, health 503)", silent + told))
    for i in behind:
        r = reports[i]
        if ref is None:
            continue
        since = r.since
        wrong = [] if since is None else gaps.after_gap_differences(dumps[i], ref, history,
                                                                    since)
        if wrong:
            failures.append(Failure(
                "gap-explained", f"node {r.node}: {len(wrong)} rows written after its gap was "
                "reported differ from the other nodes (the gap does not explain them)", wrong))
        if notes is not None:
            written_after = sum(1 for at in history.last_write_at.values()
                                if since is not None and at > since + gaps.MARGIN_S)
            notes.append(f"node {r.node} reports a gap ("
                         + ", ".join(f"{s} {a}..{b}" for s, (a, b) in sorted(r.recorded.items()))
                         + f"; health {r.health_code}): {gaps.differing_rows(dumps[i], ref)} "
                         f"rows differ from the others, explained by it; "
                         f"{written_after} rows written after it match")
    return failures


def report(failures: list[Failure], seed: int, replay: str, max_lines: int = 12) -> str:
    lines = []
    for f in failures:
        lines.append(f"INVARIANT FAILED: {f.invariant}: {f.summary}")
        lines += [f"    {d}" for d in f.details[:max_lines]]
        if len(f.details) > max_lines:
            lines.append(f"    … {len(f.details) - max_lines} more")
    lines.append(f"seed: {seed}")
    lines.append(f"replay: {replay}")
    return "\n".join(lines)


def check_indexes(dbs: list[Path]) -> list[Failure]:
    """Every node's full-text indexes agree with their content table (FTS5's integrity-check
    with rank 1) and answer MATCH with the same rows on every node."""
    details = []
    answers: dict[tuple[str, str], dict[int, list[int]]] = {}
    for i, db in enumerate(dbs, start=1):
        # integrity-check is an INSERT into the index (it writes nothing): a writable connection
        conn = sqlite3.connect(str(db), timeout=30, isolation_level=None)
        try:
            present = {str(r[0]) for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            for index in schema.FTS_INDEXES:
                if index not in present:
                    continue
                try:
                    conn.execute(f"INSERT INTO {index}({index}, rank) "
                                 "VALUES ('integrity-check', 1)")
                except sqlite3.DatabaseError as exc:
                    details.append(f"node {i}: {index} integrity-check failed: {exc}")
                for word in schema.WORDS:
                    rows = [int(r[0]) for r in conn.execute(
                        f"SELECT rowid FROM {index} WHERE {index} MATCH ? ORDER BY rowid",
                        (word,))]
                    answers.setdefault((index, word), {})[i] = rows
        finally:
            conn.close()
    for (index, word), per_node in sorted(answers.items()):
        if len({tuple(r) for r in per_node.values()}) > 1:
            details.append(f"{index} MATCH {word!r}: " + "; ".join(
                f"node {n}: {len(r)} rows {r[:8]}" for n, r in sorted(per_node.items())))
    return [Failure("derived-index", "full-text indexes wrong or different between nodes",
                    details)] if details else []


def check_bookkeeping(dbs: list[Path], migrated: list[list[str]]) -> list[Failure]:
    """Each node's migration bookkeeping lists exactly the migrations its own application ran,
    once each; the rows its migrations create (one per migration, by name) exist once on every
    node."""
    details = []
    for i, (db, ran) in enumerate(zip(dbs, migrated, strict=True), start=1):
        conn = _connect(db)
        try:
            names = [str(r[0]) for r in conn.execute(
                f"SELECT name FROM {schema.BOOKKEEPING} ORDER BY id")]
            models = [str(r[0]) for r in conn.execute("SELECT model FROM fw_content_type")]
        finally:
            conn.close()
        if names != ran:
            details.append(f"node {i}: {schema.BOOKKEEPING} lists {names}, its application ran "
                           f"{ran}")
        want = sorted({f"model_{n}" for r in migrated for n in r})
        if sorted(models) != want:
            details.append(f"node {i}: fw_content_type models {sorted(models)}, expected {want}")
    return [Failure("per-node-bookkeeping", "framework bookkeeping or framework rows wrong",
                    details)] if details else []
