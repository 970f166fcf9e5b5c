"""When parked changes are applied after a schema change, and what waits for them.

Changes of other nodes parked for a table or column this node lacked are applied once the schema
has been still for ``settle`` seconds: an application that is migrating (Django's ``migrate``,
then the rows its ``post_migrate`` creates) finishes before rows of other nodes land in the
tables it has just created. Dead letters a stricter schema refused are retried at the same
moment.

Meanwhile the rows this node republishes for a rebuilt or new table (``OP_BACKFILL``) are *held*:
read now, they would lack the parked changes and overwrite them on every node. The hold ends only
after the transaction that applied the parked changes committed, so a publisher read that starts
after it sees them.
"""

from __future__ import annotations

import time


class Settle:
    """The applier's bookkeeping for deferred parked changes (one per applier)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.changed_at = float("-inf")  # monotonic time of the last schema change seen
        self.unpark_wanted = False  # parked changes may fit now
        self.dead_retry_wanted = False  # refused dead letters may fit now
        self._hold = False
        self._held: set[str] = set()  # parked tables when last looked at (see hold_tables)
        self._unparked = False  # an unpark ran in the write transaction under way

    def schema_changed(self, *, at_start: bool) -> None:
        if not at_start:
            self.changed_at = time.monotonic()
        self.unpark_wanted = True
        self._hold = True

    def wait(self) -> float:
        """Seconds until the schema counts as settled (0: it does)."""
        return max(0.0, self.changed_at + self.seconds - time.monotonic())

    def due(self, parked: set[str]) -> bool:
        """Whether parked changes should be applied now."""
        return bool(self.unpark_wanted and parked) and self.wait() <= 0.0

    def next_due(self, parked: set[str]) -> float | None:
        """Seconds until deferred work is due (0: now), None when none waits."""
        if not ((self.unpark_wanted and parked) or self.dead_retry_wanted):
            return None
        return self.wait()

    def transaction_started(self, parked: set[str]) -> None:
        """A write transaction of the applier looked at the parked tables (before any unpark,
        which changes them before it commits)."""
        self._unparked = False
        self._held = set(parked)

    def unparking(self) -> None:
        self.unpark_wanted = False
        self._unparked = True

    def transaction_committed(self, parked: set[str]) -> None:
        """The hold ends once an unpark committed, or when nothing is parked."""
        if self._unparked or not parked:
            self._hold = False
        self._unparked = False

    def held_tables(self) -> set[str]:
        """Tables whose republished rows must not be read yet (called from another thread)."""
        return set(self._held) if self._hold else set()
