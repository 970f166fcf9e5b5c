"""The change watcher: notices commits within milliseconds and checkpoints the WAL meanwhile."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from harmonylite.db.connection import open_connection, trim_wal

log = logging.getLogger(__name__)

CHECKPOINT_EVERY = 0.01  # seconds between background WAL checkpoints while the database changes
TRIM_EVERY = 1.0  # seconds between looks at the WAL's size (see ``trim_wal``)


class ChangeWatcher:
    """Wakes the publisher when the database changes: polls ``PRAGMA data_version``.

    The pragma reads a counter in shared memory, so a poll costs microseconds and no I/O; polling
    every few milliseconds keeps detection prompt without spinning a core.

    It also checkpoints the WAL after changes (PASSIVE: it never waits for, or blocks, a reader or
    a writer). The change log doubles the WAL frames each application commit writes, and with them
    the checkpoints SQLite would otherwise run inside the application's commits once the WAL
    passes 1,000 frames; done here, on the node's own thread, that cost leaves the application.

    Once a second it gives back the space of a WAL that grew past ``WAL_SIZE_LIMIT`` (a long
    reader held it back), as soon as no reader needs it, also when nothing is written any more.
    """

    def __init__(self, db_path: str, interval: float, wake: Callable[[], None],
                 checkpoint_every: float = CHECKPOINT_EVERY,
                 on_schema: Callable[[], None] | None = None) -> None:
        self._db_path = db_path
        self._interval = interval
        self._wake = wake
        self._checkpoint_every = checkpoint_every
        self._on_schema = on_schema
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        conn = open_connection(self._db_path)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            schema = conn.execute("PRAGMA schema_version").fetchone()[0]
            # Commits made before this first read do not move ``data_version`` for this
            # connection. The publisher's first look may have come before them (this thread
            # starts late on a busy machine): one wake now, or they would wait for the next
            # commit, which an idle application may never make.
            self._wake()
            dirty, checkpointed = False, time.monotonic()
            trimmed = checkpointed
            failing: str | None = None
            while not self._stop.wait(self._interval):
                try:
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now != last:
                        last, dirty = now, True
                        self._wake()
                        # A DDL commit moves data_version too: only then is the schema read.
                        version = conn.execute("PRAGMA schema_version").fetchone()[0]
                        if version != schema:
                            schema = version
                            if self._on_schema is not None:
                                self._on_schema()
                    if dirty and time.monotonic() - checkpointed >= self._checkpoint_every:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        dirty, checkpointed = False, time.monotonic()
                    if time.monotonic() - trimmed >= TRIM_EVERY:
                        trimmed = time.monotonic()
                        if trim_wal(conn, self._db_path):
                            log.debug("WAL truncated")
                    if failing is not None:
                        log.info("change watcher reads the database again")
                        failing = None
                except sqlite3.Error as exc:
                    # Polled every few ms: say it once per state change, not on every poll.
                    if str(exc) != failing:
                        log.warning("change watcher cannot read the database (retrying): %s",
                                    exc)
                    failing = str(exc)
        finally:
            conn.close()

