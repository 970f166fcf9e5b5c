"""The cluster as its heartbeats show it: one row per node, its state, worst first (pure).

A node is ``down`` when its newest record (heartbeat or last-seen) is older than
:data:`DOWN_AFTER_SECONDS` or says it stopped; ``unhealthy`` when its own health says so, when it
is more than ``max_lag`` messages behind, or when a table's schema hash differs from the one most
nodes have; ``healthy`` otherwise. A down node's lag is counted against the stream heads the live
nodes report, so it grows while the others write. ``cluster status`` and the live page both read
this, from the same buckets.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

DOWN_AFTER_SECONDS = 6.0  # six beats missed
DEFAULT_MAX_LAG = 1000  # messages behind a stream's head before a node counts as behind
STATES = ("down", "unhealthy", "healthy")  # worst first


def newest(records: Iterable[Mapping[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per node id, the newest of the records given (by their ``at``)."""
    out: dict[int, dict[str, Any]] = {}
    for r in records:
        node = r.get("node_id")
        if not isinstance(node, int):
            continue
        if node not in out or float(r.get("at") or 0) > float(out[node].get("at") or 0):
            out[node] = dict(r)
    return out


def stream_heads(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """Each stream's last sequence, the highest any record reports."""
    heads: dict[str, int] = {}
    for r in records:
        for name, s in (r.get("streams") or {}).items():
            last = max(int(s.get("stream_last_sequence") or 0), int(s.get("applied_sequence") or 0))
            heads[name] = max(heads.get(name, 0), last)
    return heads


def usual_schema(records: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """Per table, the hash most nodes have (ties go to the smallest hash, so every reader
    agrees)."""
    counts: dict[str, Counter[str]] = {}
    for r in records:
        for table, h in (r.get("schema") or {}).items():
            counts.setdefault(table, Counter())[str(h)] += 1
    return {t: min(c.items(), key=lambda kv: (-kv[1], kv[0]))[0] for t, c in counts.items()}


def build(records: Iterable[Mapping[str, Any]], *, now: float | None = None,
          max_lag: int = DEFAULT_MAX_LAG,
          down_after: float = DOWN_AFTER_SECONDS) -> dict[str, Any]:
    """The document ``cluster status --json`` prints and ``/cluster.json`` serves."""
    now = time.time() if now is None else now
    latest = newest(records)
    live = {n: r for n, r in latest.items()
            if not r.get("stopped") and now - float(r.get("at") or 0) < down_after}
    heads = stream_heads(latest.values())
    schema = usual_schema(live.values() or latest.values())
    leader = _leader(live.values())
    nodes = [_row(r, now=now, live=n in live, heads=heads, schema=schema, leader=leader,
                  max_lag=max_lag) for n, r in latest.items()]
    nodes.sort(key=lambda v: (STATES.index(v["state"]), -v["lag_messages"], v["node_id"]))
    return {"nodes": nodes, "leader": leader, "healthy": all(v["state"] == "healthy"
                                                             for v in nodes) and bool(nodes),
            "stream_heads": heads, "at": round(now, 3), "max_lag": max_lag,
            "down_after_seconds": down_after}


def _leader(records: Iterable[Mapping[str, Any]]) -> int | None:
    """The snapshot lease holder: a live node that says it leads, else what most report."""
    holders: Counter[int] = Counter()
    for r in records:
        lease = r.get("lease") or {}
        if lease.get("leader"):
            return int(r["node_id"])
        if isinstance(lease.get("holder"), int):
            holders[lease["holder"]] += 1
    return holders.most_common(1)[0][0] if holders else None


def _row(r: Mapping[str, Any], *, now: float, live: bool, heads: Mapping[str, int],
         schema: Mapping[str, str], leader: int | None, max_lag: int) -> dict[str, Any]:
    age = max(0.0, now - float(r.get("at") or 0))
    streams = {name: dict(s) for name, s in (r.get("streams") or {}).items()}
    reasons: list[str] = []
    if live:
        reasons.extend(str(x) for x in r.get("reasons") or ())
        lag = int(r.get("lag_messages") or 0)
    else:
        # Behind what the live nodes report: grows while the others write.
        for name, s in streams.items():
            s["lag_messages"] = max(0, heads.get(name, 0) - int(s.get("applied_sequence") or 0))
        lag = sum(int(s["lag_messages"]) for s in streams.values())
        reasons.append(("stopped " if r.get("stopped") else "no heartbeat for ")
                       + f"{_ago(age)}" + (" ago" if r.get("stopped") else ""))
    if live and lag > max_lag:
        reasons.append(f"{lag} messages behind (limit {max_lag})")
    own = r.get("schema") or {}
    # No tables reported: not known yet (a node that has not read its schema), not "differs".
    differs = sorted(t for t, h in schema.items() if own.get(t) != h) if own else []
    if differs:
        reasons.append("schema differs from the cluster's: " + ", ".join(differs))
    state = "down" if not live else "healthy" if not reasons else "unhealthy"
    history = [list(p) for p in r.get("lag_history") or ()]
    history.append([round(now, 3), lag])  # where it stands now (a down node's keeps moving)
    return {
        "node_id": int(r["node_id"]),
        "state": state,
        "reasons": reasons,
        "last_seen_seconds": round(age, 1),
        "leader": leader == r.get("node_id"),
        "host": r.get("host"),
        "version": r.get("version"),
        "publish": r.get("publish"),
        "replicate": r.get("replicate"),
        "lag_messages": lag,
        "lag_seconds": float(r.get("lag_seconds") or 0) if live else None,
        "streams": streams,
        "lease": r.get("lease"),
        "snapshot": _snapshot(r.get("snapshot"), 0.0 if live else age),
        "schema": own,
        "schema_differs": differs,
        "dead_letters": int(r.get("dead_letters") or 0),
        "conflicts": int(r.get("conflicts") or 0),
        "parked_changes": int(r.get("parked_changes") or 0),
        "db_bytes": int(r.get("db_bytes") or 0),
        "wal_bytes": int(r.get("wal_bytes") or 0),
        "uptime_seconds": r.get("uptime_seconds") if live else None,
        "warnings": list(r.get("warnings") or ()),
        "lag_history": history,
    }


def _snapshot(snap: Mapping[str, Any] | None, since: float) -> dict[str, Any] | None:
    """The snapshot a record names, its age as of now (a down node's record is ``since``
    seconds old)."""
    if snap is None:
        return None
    out = dict(snap)
    if isinstance(out.get("age_seconds"), int | float):
        out["age_seconds"] = round(out["age_seconds"] + since, 3)
    return out


def _ago(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h"
    return f"{s // 86400} d"


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_table(doc: Mapping[str, Any]) -> str:
    """The table ``cluster status`` prints, worst first."""
    header = ("NODE", "STATE", "HOST", "LAG", "LEASE", "SNAPSHOT AGE", "DEAD", "CONFLICTS",
              "PARKED", "DB", "WAL", "UP / SEEN", "WHY")
    rows = [header]
    for v in doc["nodes"]:
        snap = v.get("snapshot") or {}
        age = snap.get("age_seconds")
        rows.append((
            str(v["node_id"]), v["state"], str(v.get("host") or "-"),
            f"{v['lag_messages']} msgs" + (f" {v['lag_seconds']:.1f} s"
                                           if v.get("lag_seconds") else ""),
            "leader" if v["leader"] else "-",
            "-" if age is None else _ago(float(age)),
            str(v["dead_letters"]), str(v["conflicts"]), str(v["parked_changes"]),
            _size(v["db_bytes"]), _size(v["wal_bytes"]),
            f"up {_ago(float(v['uptime_seconds']))}" if v.get("uptime_seconds") is not None
            else f"seen {_ago(v['last_seen_seconds'])} ago",
            "; ".join(v["reasons"]) or "-",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1]
             for row in rows]
    if not doc["nodes"]:
        lines.append("no node has put a heartbeat yet")
    return "\n".join(line.rstrip() for line in lines)
