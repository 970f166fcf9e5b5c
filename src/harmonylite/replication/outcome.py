"""What applying a group of messages did, and which errors are worth retrying."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field


@dataclass
class ApplyResult:
    last_seq: int = 0
    messages: int = 0
    rows: int = 0
    skipped_pending: int = 0
    parked: int = 0  # changes to tables this database does not have, kept for later
    unparked: int = 0
    duplicates: int = 0  # changes already applied from an earlier copy of the same batch
    failed: list[tuple[int, str]] = field(default_factory=list)  # (sequence, reason)
    dead_letters: int = 0  # changes written to the dead-letter table
    origin_nodes: set[int] = field(default_factory=set)
    published_at: float | None = None  # JetStream time of the last message, for the lag metric


class UnknownTable(Exception):
    """A statement was wanted for a table that vanished while the batch was being applied."""


APPLIED, SKIPPED, PARKED, DUPLICATE, DEAD = 0, 1, 2, 3, 4

# SQLite primary result codes that say "not now" rather than "never": busy, locked, out of
# memory, read-only, I/O error, disk full, cannot open, locking protocol, schema changed.
TRANSIENT_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15, 17})


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same work later may succeed (nothing about the change is wrong)."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            return (int(code) & 0xFF) in TRANSIENT_CODES
        text = str(exc).lower()
        return isinstance(exc, sqlite3.OperationalError) and any(
            w in text for w in ("locked", "busy", "disk", "i/o", "unable to open"))
    return isinstance(exc, OSError | MemoryError | UnknownTable)


