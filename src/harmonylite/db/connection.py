"""SQLite connections: pragmas, identifier quoting, and a thread that owns a connection.

sqlite3 calls block, so every connection lives on its own single worker thread and the event loop
only awaits futures (DESIGN rule 12).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

PREFIX = "__harmonylite__"
# The WAL is cut back to this size when SQLite restarts it (``journal_size_limit``), and
# ``trim_wal`` truncates a WAL that grew past it. A long reader on a node that keeps receiving
# rows makes the WAL grow (it cannot be reset while the reader may need it); without a limit
# SQLite keeps the file at its largest size for good.
WAL_SIZE_LIMIT = 4 * 1024 * 1024


class RawText(bytes):
    """A TEXT value whose bytes are not valid UTF-8 (kept as bytes; written back as TEXT)."""

    __slots__ = ()


def text_factory(data: bytes) -> str | RawText:
    """sqlite3 text factory that never fails: invalid UTF-8 comes back as RawText."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return RawText(data)


def fetch_all(conn: sqlite3.Connection, sql: str,
              params: tuple[object, ...] = ()) -> list[Any]:
    """``execute(sql, params).fetchall()`` that reads text which is not valid UTF-8 too.

    The default text factory decodes in C; a Python one costs about twice as much per value, so
    it is used only for a read that met such text (the application stored bytes as TEXT).
    """
    try:
        return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "decode" not in str(exc):
            raise
    previous = conn.text_factory
    conn.text_factory = text_factory
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.text_factory = previous


def quote_ident(name: str) -> str:
    """Quote an SQL identifier: wrap in double quotes, doubling any inside."""
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# How often a writer of the node tries the write lock again while another connection holds it.
LOCK_RETRY = 0.0005


def begin_immediate(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting for the write lock up to the connection's busy timeout, and
    trying again every ``LOCK_RETRY`` seconds meanwhile.

    SQLite's own busy handler sleeps longer after each failed try (up to 100 ms a time): next to
    an application that commits every millisecond, the node's writer found the lock taken again
    and again and waited seconds, and replication with it. Short tries take the lock between two
    of the application's commits.
    """
    timeout_ms = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    if timeout_ms <= 0:
        conn.execute("BEGIN IMMEDIATE")
        return
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() >= deadline:
                    raise
            time.sleep(LOCK_RETRY)  # the lock's holder is another connection: nothing to wake us
    finally:
        conn.execute(f"PRAGMA busy_timeout = {timeout_ms}")


@contextlib.contextmanager
def write_transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back if the block raises (anything at all)."""
    begin_immediate(conn)
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextlib.contextmanager
def savepoint(conn: sqlite3.Connection, name: str) -> Iterator[None]:
    """The block under ``SAVEPOINT name``: released when it ends, rolled back to the savepoint
    (and released) when it raises, the exception going on to the caller."""
    conn.execute(f"SAVEPOINT {name}")
    try:
        yield
    except BaseException:
        conn.execute(f"ROLLBACK TO {name}")
        conn.execute(f"RELEASE {name}")
        raise
    conn.execute(f"RELEASE {name}")


def plain_connection(path: str | Path, *, readonly: bool = False, timeout: float = 5.0,
                     any_thread: bool = False) -> sqlite3.Connection:
    """A connection with SQLite's own settings (autocommit; no WAL switch, no pragmas): for a
    file the node does not run on (a snapshot being verified or installed, a copy) or one quick
    look at one it does. ``timeout``: seconds to wait for a lock (0: fail at once)."""
    target, uri = (f"file:{Path(path)}?mode=ro", True) if readonly else (str(path), False)
    return sqlite3.connect(target, uri=uri, isolation_level=None, timeout=timeout,
                           check_same_thread=not any_thread)


def open_connection(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection in autocommit mode (transactions are explicit), WAL, NORMAL sync."""
    if readonly:
        conn = sqlite3.connect(
            f"file:{Path(path)}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
        )
    else:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    if not readonly:
        mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
    return conn


def wal_size(db_path: str | Path) -> int:
    try:
        return os.path.getsize(f"{db_path}-wal")
    except FileNotFoundError:
        return 0


def trim_wal(conn: sqlite3.Connection, db_path: str | Path, limit: int = WAL_SIZE_LIMIT) -> bool:
    """Truncate the WAL when it grew past ``limit`` and nothing needs it any more; True if done.

    Never waits: a PASSIVE checkpoint first (it waits for no one); only when that copied every
    frame into the database does a TRUNCATE follow, with no busy timeout, so a reader that still
    uses the WAL or a writer in progress makes it give up at once (tried again later). The
    writer lock it takes meanwhile is held for an ``ftruncate``: all frames are copied already.
    """
    if wal_size(db_path) <= limit:
        return False
    busy, frames, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if busy or frames != copied:
        return False  # a reader still needs frames the database does not have
    previous = int(conn.execute("PRAGMA busy_timeout").fetchone()[0])
    conn.execute("PRAGMA busy_timeout = 0")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout = {previous}")
    return not busy


class DbThread:
    """One connection, one thread: every call runs on the thread that opened the connection."""

    def __init__(self, path: str | Path, name: str, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"db-{name}")
        self._conn: sqlite3.Connection | None = None
        self._aux: sqlite3.Connection | None = None
        self._readonly = readonly

    def _open(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = open_connection(self.path, readonly=self._readonly)
        return self._conn

    def aux(self) -> sqlite3.Connection:
        """A second connection on this thread (call only from inside ``call``): it writes while
        the first holds a read transaction open; closed with the thread."""
        if self._aux is None:
            self._aux = open_connection(self.path, readonly=self._readonly)
        return self._aux

    async def call(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, lambda: fn(self._open()))

    async def call_waiting(self, fn: Callable[[sqlite3.Connection], T], what: str,
                           stop: asyncio.Event | None = None) -> T:
        """``call(fn)``, tried again for as long as another connection holds the write lock
        past SQLite's busy timeout (an application's long transaction): said once, never a
        reason to give up. ``stop`` ends the wait (the error is raised then)."""
        warned = False
        while True:
            try:
                return await self.call(fn)
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or (
                        stop is not None and stop.is_set()):
                    raise
                if not warned:
                    log.warning("waiting for the write lock on %s to %s: %s", self.path, what,
                                exc, extra={"path": str(self.path)})
                    warned = True
            # Each try already waited a whole busy timeout inside SQLite: try again at once.

    def call_sync(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return self._pool.submit(lambda: fn(self._open())).result()

    def close(self) -> None:
        def _close() -> None:
            for conn in (self._conn, self._aux):
                if conn is not None:
                    conn.close()
            self._conn = self._aux = None

        self._pool.submit(_close).result()
        self._pool.shutdown(wait=True)
