"""Installing a verified snapshot database into ``db_path`` under SQLite's own locking.

The verified file first gets change capture (the change-log tables and every table's triggers),
the manifest's stream positions (``__harmonylite__seq``), the origins' high-water marks and the
parked changes the snapshot carries, so data, positions and capture arrive together: an
application that writes the moment the install commits is captured, before any node code runs.
It is then copied into the live database with SQLite's backup API: the copy runs inside one write
transaction of the destination, through its WAL (or rollback journal), so a crash at any moment
leaves the old database or the new one, never a mix, and connections other processes hold see
the new content at their next transaction. Nothing here runs on the event loop; callers use
worker threads.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.install import TableFilter
from harmonylite.cdc.install import install as install_capture
from harmonylite.db.connection import plain_connection, write_transaction

log = logging.getLogger(__name__)

# Pages copied per backup step: the destination's write transaction stays open across steps.
STEP_PAGES = 4096
# Test hook: ``mid:PATH`` pauses inside the copy, ``after:PATH`` once it is committed (before the
# sequence map is written); PATH is created when the pause begins.
PAUSE_ENV = "HARMONYLITE_TEST_PAUSE_INSTALL"
PAUSE_SECONDS = 120.0
# The byte of the ``-shm`` file every connection to a WAL database holds a shared lock on.
SHM_DMS_BYTE = 128


def _pause_hook(phase: str) -> Path | None:
    value = os.environ.get(PAUSE_ENV, "")
    kind, _, path = value.partition(":")
    return Path(path) if kind == phase and path else None


def _pause(marker: Path) -> None:
    log.warning("pausing the install for a test (%s)", PAUSE_ENV)
    marker.write_text(str(os.getpid()))
    threading.Event().wait(PAUSE_SECONDS)


def page_size(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA page_size").fetchone()[0])


@dataclass(frozen=True)
class Carried:
    """What a snapshot carries besides its tables (see :class:`Manifest`)."""

    origins: dict[str, dict[str, int]] = field(default_factory=dict)
    parked: list[dict[str, Any]] = field(default_factory=list)


def prepare(verified: Path, sequences: dict[str, int], page_bytes: int | None,
            carried: Carried | None = None, replicated: TableFilter | None = None) -> None:
    """Add change capture, the positions and what the snapshot carries to the verified copy
    (and give it the destination's page size: a WAL destination only takes pages of its own
    size). ``replicated``: the node's table filter, so excluded tables get no capture and the
    triggers keeping them fire for replicated rows from the start."""
    carried = carried or Carried()
    conn = plain_connection(verified)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        if page_bytes is not None and page_size(conn) != page_bytes:
            conn.execute(f"PRAGMA page_size = {int(page_bytes)}")
            conn.execute("VACUUM")
        install_capture(conn, replicated)
        with write_transaction(conn):
            conn.execute(f"DELETE FROM {ddl.SEQ}")
            conn.executemany(f"INSERT INTO {ddl.SEQ}(stream, seq) VALUES (?, ?)",
                             sorted(sequences.items()))
            conn.execute(f"DELETE FROM {ddl.ORIGINS}")
            conn.executemany(f"INSERT INTO {ddl.ORIGINS}(origin, stream, hwm) VALUES (?, ?, ?)",
                             [(o, s, h) for s, marks in sorted(carried.origins.items())
                              for o, h in sorted(marks.items())])
            conn.execute(f"DELETE FROM {ddl.PARKED}")
            conn.executemany(
                f"INSERT INTO {ddl.PARKED}(stream, seq, tbl, op, columns, keys, vals) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(p["stream"], int(p["seq"]), p["tbl"], int(p["op"]), p["columns"], p["keys"],
                  base64.b64decode(p["vals"])) for p in carried.parked])
    finally:
        conn.close()


def prepare_for(verified: Path, db_path: Path, sequences: dict[str, int],
                 carried: Carried | None = None, replicated: TableFilter | None = None) -> None:
    """:func:`prepare` the verified copy for installing into ``db_path`` (its page size)."""
    page_bytes: int | None = None
    if db_path.exists():
        conn = plain_connection(db_path)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            if int(conn.execute("PRAGMA page_count").fetchone()[0]) > 0:
                page_bytes = page_size(conn)
        finally:
            conn.close()
    prepare(verified, sequences, page_bytes, carried, replicated)


class PendingAppeared(Exception):
    """The application captured changes after the last publish; the install was rolled back."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(f"{count} local changes were captured after the last publish")


def check_nothing_pending(db_path: Path) -> None:
    """Raise PendingAppeared when ``db_path`` holds unpublished changes (a locked_check)."""
    count = pending_changes(db_path)
    if count:
        raise PendingAppeared(count)


def install_file(verified: Path, db_path: Path, sequences: dict[str, int],
                 step_pages: int = STEP_PAGES,
                 locked_check: Callable[[], None] | None = None,
                 carried: Carried | None = None, prepared: bool = False) -> None:
    """Replace the content of ``db_path`` (created when missing) with the verified database,
    whose positions become ``sequences``; atomic, under the destination's locks.

    ``locked_check`` runs once the copy holds the destination's write lock and before anything is
    committed: no application can write any more, and what it wrote before is visible. If it
    raises, the copy is rolled back and the exception propagates (the live database is as it
    was). This closes the window between publishing the pending changes and the install.
    ``prepared``: :func:`prepare_for` already ran on ``verified`` (so that the moment between
    the caller's last publish and the write lock stays as short as possible).
    """
    dest = plain_connection(db_path, any_thread=True)
    try:
        dest.execute("PRAGMA busy_timeout = 30000")
        fresh = int(dest.execute("PRAGMA page_count").fetchone()[0]) == 0
        if fresh:
            src = plain_connection(verified, readonly=True)
            try:
                dest.execute(f"PRAGMA page_size = {page_size(src)}")
            finally:
                src.close()
            dest.execute("PRAGMA journal_mode = WAL")
        elif str(dest.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
            # The node runs every database in WAL mode; switching now also lets the check
            # below read while the copy holds the write lock (a rollback journal would block it).
            dest.execute("PRAGMA journal_mode = WAL")
        if not prepared:
            prepare(verified, sequences, None if fresh else page_size(dest), carried)
        dest.execute("PRAGMA synchronous = FULL")  # the commit is on disk before we go on
        mid = _pause_hook("mid")
        if mid is not None:
            # Small steps and a tiny cache: uncommitted pages spill into the WAL before the pause.
            step_pages = 4
            dest.execute("PRAGMA cache_size = 8")
        paused = checked = False
        if locked_check is not None:
            # At least two steps, so the check runs while the copy is still uncommitted.
            pages = max(1, _page_count(verified) - 1)
            step_pages = min(step_pages, pages)

        def progress(status: int, remaining: int, total: int) -> None:
            nonlocal paused, checked
            if locked_check is not None and not checked and remaining > 0:
                checked = True
                locked_check()
            if mid is not None and not paused and 0 < remaining <= total // 2:
                paused = True
                _pause(mid)

        src = plain_connection(verified, readonly=True, any_thread=True)
        try:
            src.backup(dest, pages=step_pages, progress=progress)
        finally:
            src.close()
        after = _pause_hook("after")
        if after is not None:
            _pause(after)
        try:
            dest.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError as exc:  # readers in the way: SQLite checkpoints later
            log.debug("checkpoint after the restore deferred: %s", exc)
    finally:
        dest.close()


def _page_count(path: Path) -> int:
    conn = plain_connection(path, readonly=True)
    try:
        return int(conn.execute("PRAGMA page_count").fetchone()[0])
    finally:
        conn.close()


def pending_changes(db_path: Path) -> int:
    """Captured changes not yet published in the database at ``db_path`` (0 without capture)."""
    if not db_path.exists():
        return 0
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        return changelog.pending_count(conn)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return 0
        raise
    finally:
        conn.close()


def epoch_of(db_path: Path) -> str | None:
    """The database copy's epoch token (part of its message ids), when it has one."""
    conn = plain_connection(db_path)
    try:
        row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = 'epoch'").fetchone()
    except sqlite3.OperationalError:
        return None
    finally:
        conn.close()
    return str(row[0]) if row else None


def applied_positions(db_path: Path) -> dict[str, int]:
    """The stream positions recorded in the database (empty without change capture)."""
    if not db_path.exists():
        return {}
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        return changelog.applied_sequences(conn)
    finally:
        conn.close()


def recorded_gaps(db_path: Path) -> dict[str, tuple[int, int]]:
    """Gaps the node found while running (see :func:`changelog.record_gap`)."""
    if not db_path.exists():
        return {}
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        return changelog.recorded_gaps(conn)
    finally:
        conn.close()


def in_use(db_path: Path) -> str | None:
    """Why the database looks open in another process (a running node), or None.

    Every connection to a WAL database holds a shared lock on one byte of the ``-shm`` file
    while it is open, idle or not; a transaction in progress holds the database file's locks.
    """
    if not db_path.exists():
        return None
    shm = Path(f"{db_path}-shm")
    if shm.exists():
        fd = os.open(shm, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, SHM_DMS_BYTE)
        except OSError:
            return f"{db_path} is open in another process (is the node running?)"
        else:
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, SHM_DMS_BYTE)
        finally:
            os.close(fd)
    conn = plain_connection(db_path, timeout=0)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        return f"{db_path} is locked by another process ({exc})"
    finally:
        conn.close()
    return None


def remove_durably(path: Path) -> None:
    """Unlink ``path`` (if present) and sync its directory, so the removal survives a crash."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def create_empty(db_path: Path) -> None:
    """An empty WAL database at ``db_path``, synced to disk."""
    conn = plain_connection(db_path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA user_version")  # touches the file so it exists with a header
    finally:
        conn.close()
    fd = os.open(db_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
