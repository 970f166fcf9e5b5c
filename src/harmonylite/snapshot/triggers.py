"""What makes a snapshot due: the measures the scheduler's triggers compare against.

The scheduler (:mod:`harmonylite.snapshot.scheduler`) looks at these every check period while its
node holds the lease.
"""

from __future__ import annotations

from harmonylite.ops.health import to_epoch


def count_threshold(max_entries: int, shards: int) -> int:
    """Messages on any stream after which a snapshot is due: half of what a stream keeps.

    Every stream keeps ``max_entries`` messages (not a share of them per shard), and a snapshot
    must exist well inside what the streams still hold, so half leaves the other half for the
    capture, the upload and a restoring node to catch up. ``shards`` no longer divides it.
    """
    del shards
    return max(1, max_entries // 2)


def streams_past(last: dict[str, int], base: dict[str, int], threshold: int) -> list[str]:
    """Streams whose last sequence is ``threshold`` or more past ``base`` (the snapshot's)."""
    return sorted(s for s, seq in last.items() if seq - base.get(s, 0) >= threshold)


def snapshot_age(created_at: str, now: float) -> float:
    """Seconds since ``created_at`` (0 when unreadable or in the future)."""
    ts = to_epoch(created_at)
    return 0.0 if ts is None else max(0.0, now - ts)


def check_period(heartbeat: float) -> float:
    """How often the message counts (and snapshot requests) are looked at: promptly, since a
    busy stream can pass half its retention in seconds; one stream_info per stream is cheap."""
    return max(0.5, min(1.0, heartbeat))
