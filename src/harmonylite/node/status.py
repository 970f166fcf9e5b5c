"""What a node reports about its replication: per-stream state, problems (health 503) and
warnings (worth a look, still healthy)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from harmonylite.node.supervisor import Supervisor
from harmonylite.replication.consumer import ShardConsumer

STALL_GRACE = 5.0  # seconds a consumer may be stalled before health turns 503


def replication(consumers: Sequence[ShardConsumer],
                gaps: dict[str, tuple[int, int]]) -> dict[str, Any]:
    now = time.time()
    out: dict[str, Any] = {}
    for c in consumers:
        lag = c.lag
        out[c.stream] = {
            "applied_sequence": c.position,
            "stream_last_sequence": c.stream_last_seq,
            "lag_messages": lag,
            "lag_seconds": round(now - c.last_message_at, 3) if lag and c.last_message_at
            else 0.0,
            "stalled": c.stalled,
            "consuming": c.not_consuming is None,
            "gap": list(gaps[c.stream]) if c.stream in gaps else None,
        }
    return out


def problems(supervisor: Supervisor, consumers: Sequence[ShardConsumer],
             gaps: dict[str, tuple[int, int]]) -> list[str]:
    """Why replication is not healthy (each makes health 503)."""
    out = list(supervisor.problems())
    now = time.monotonic()
    for c in consumers:
        if c.stalled is not None and now - (c.stalled_since or now) >= STALL_GRACE:
            out.append(f"apply stalled on {c.stream}: {c.stalled}")
        if c.not_consuming is not None:
            out.append(f"stream {c.stream} is not being consumed: {c.not_consuming}")
    for stream, (first, last) in sorted(gaps.items()):
        out.append(f"stream {stream} dropped messages {first}..{last} before this node "
                   "applied them: restore it from a snapshot that covers them")
    return out


def warnings(dead_letters: int, conflicts: int) -> list[str]:
    """Worth an operator's look, not unhealthy."""
    out = []
    if dead_letters:
        out.append(f"{dead_letters} changes could not be applied: harmonylite dead-letters list")
    if conflicts:
        out.append(f"{conflicts} rows were displaced by conflicts: harmonylite conflicts list")
    return out
