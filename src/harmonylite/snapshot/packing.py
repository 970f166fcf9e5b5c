"""The blocking steps of a snapshot, run in worker threads: copy, sanitize, compress+hash.

Every step streams in fixed-size chunks, so memory does not grow with the database. A full disk
is reported as :class:`DiskFull` naming the step; the pipeline turns it into NoSpaceError.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import zstandard

from harmonylite.cdc import ddl, origin
from harmonylite.cdc.changelog import applied_sequences
from harmonylite.cdc.install import remove_all
from harmonylite.cdc.schema import schema_hash, user_tables
from harmonylite.errors import SnapshotError, VerificationError
from harmonylite.snapshot.manifest import Manifest

CHUNK = 1024 * 1024
ZSTD_LEVEL = 3
ZSTD_THREADS = 2
SQLITE_FULL = 13
_PROGRESS_OPCODES = 10_000


class DiskFull(Exception):
    """The temp dir filled up during ``step``."""

    def __init__(self, step: str) -> None:
        super().__init__(f"no space left on device during {step}")
        self.step = step


class Cancelled(SnapshotError):
    def __init__(self) -> None:
        super().__init__("snapshot capture cancelled")


def reason(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code == SQLITE_FULL or "database or disk is full" in str(exc)


def _connect(path: str | Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 10000")
    return conn


def live_sequences(db_path: str | Path) -> dict[str, int]:
    """The stream positions the live database has applied (cheap: one small table)."""
    conn = _connect(db_path)
    try:
        return applied_sequences(conn)
    finally:
        conn.close()


def vacuum_into(db_path: str | Path, copy: Path, cancel: threading.Event) -> None:
    """A transactionally consistent copy of the live database (WAL content included).

    A fresh connection reads in one transaction while writers keep writing to the WAL.
    """
    conn = _connect(db_path)
    try:
        conn.set_progress_handler(lambda: 1 if cancel.is_set() else 0, _PROGRESS_OPCODES)
        conn.execute("VACUUM INTO ?", (str(copy),))
    except sqlite3.Error as exc:
        if _is_disk_full(exc):
            raise DiskFull("VACUUM INTO") from exc
        if cancel.is_set():
            raise Cancelled() from exc
        raise SnapshotError(f"VACUUM INTO failed: {exc}") from exc
    finally:
        conn.close()


@dataclass(frozen=True)
class Facts:
    """What the sanitized copy holds."""

    db_bytes: int
    sequences: dict[str, int]
    schema_hash: str
    tables: list[str]
    origins: dict[str, dict[str, int]] = field(default_factory=dict)
    parked: list[dict[str, Any]] = field(default_factory=list)
    local: dict[str, Any] = field(default_factory=dict)  # see ``local_changes``


def local_changes(conn: sqlite3.Connection, origins: dict[str, dict[str, int]]
                  ) -> dict[str, Any]:
    """The taking node's own changes the copy holds that had not all come back from the streams
    (``{}``: none): its origins and its newest change id. Such a copy is ahead of its
    ``sequences`` by them; a point-in-time restore starts from it only for a point the streams
    hold them by (see ``restore.point_in_time``)."""
    if not _table_exists(conn, ddl.LOG) or not _table_exists(conn, ddl.STATE):
        return {}
    top = conn.execute(f"SELECT max(id) FROM {ddl.LOG}").fetchone()[0]
    mine = origin.own_origins(conn)
    if top is None or not mine:
        return {}
    back = max((hwm for marks in origins.values() for o, hwm in marks.items() if o in mine),
               default=0)
    return {"origins": sorted(mine), "upto": int(top)} if int(top) > back else {}


def _table_exists(conn: sqlite3.Connection, name: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (name,)).fetchone() is not None


def carried_state(conn: sqlite3.Connection) -> tuple[dict[str, dict[str, int]],
                                                     list[dict[str, Any]]]:
    """What the copy has received beyond its user tables, which the sequences it claims imply:
    per stream the origins' high-water marks, and the parked changes (for a table it lacks).

    Dead letters and recorded gaps stay behind: they describe this node's own failures, and
    another node must not inherit them.
    """
    origins: dict[str, dict[str, int]] = {}
    if _table_exists(conn, ddl.ORIGINS):
        for origin, stream, hwm in conn.execute(f"SELECT origin, stream, hwm FROM {ddl.ORIGINS}"):
            origins.setdefault(str(stream), {})[str(origin)] = int(hwm)
    parked: list[dict[str, Any]] = []
    if _table_exists(conn, ddl.PARKED):
        rows = conn.execute(f"SELECT stream, seq, tbl, op, columns, keys, vals FROM {ddl.PARKED} "
                            "ORDER BY id")
        for stream, seq, tbl, op, columns, keys, vals in rows:
            raw = vals if isinstance(vals, bytes) else str(vals).encode()
            parked.append({"stream": str(stream), "seq": int(seq), "tbl": str(tbl), "op": int(op),
                           "columns": str(columns), "keys": str(keys),
                           "vals": base64.b64encode(raw).decode("ascii")})
    return origins, parked


def sanitize(copy: Path) -> Facts:
    """Read the stream sequences the copy contains (and what comes with them, see
    :func:`carried_state`), then drop every harmonylite object.

    Freed pages are zeroed (``secure_delete``) instead of running a second VACUUM: zstd squeezes
    zero pages to almost nothing, at a fraction of the VACUUM's cost. The copy is a throwaway
    until uploaded, so it runs without a journal or fsyncs, and ends in journal_mode DELETE:
    the stored file is self-contained (no WAL needed to read it).
    """
    conn = _connect(copy)
    try:
        conn.execute("PRAGMA journal_mode = DELETE")
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        sequences = applied_sequences(conn)
        origins, parked = carried_state(conn)
        local = local_changes(conn, origins)
        conn.execute("PRAGMA secure_delete = ON")
        remove_all(conn)
        tables, virtual = user_tables(conn)
        names = sorted({t.name for t in tables} | set(virtual))
        digest = schema_hash(conn)
        conn.execute("PRAGMA journal_mode = DELETE")
    except sqlite3.Error as exc:
        if _is_disk_full(exc):
            raise DiskFull("sanitize") from exc
        raise SnapshotError(f"sanitizing the snapshot copy failed: {exc}") from exc
    finally:
        conn.close()
    return Facts(copy.stat().st_size, sequences, digest, names, origins, parked, local)


@dataclass(frozen=True)
class Packed:
    path: Path  # the file to upload
    db_bytes: int
    db_sha256: str
    stored_bytes: int
    stored_sha256: str


class _HashingReader:
    """File reader that hashes, counts and reports what it hands out."""

    def __init__(self, fh: BinaryIO, advance: Callable[[int], None], cancel: threading.Event):
        self.fh, self.advance, self.cancel = fh, advance, cancel
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        if self.cancel.is_set():
            raise Cancelled()
        data = self.fh.read(n)
        self.sha.update(data)
        self.size += len(data)
        self.advance(len(data))
        return data


class _HashingWriter:
    def __init__(self, fh: BinaryIO) -> None:
        self.fh = fh
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += view.nbytes
        return self.fh.write(view)


def pack(
    copy: Path, compression: str, advance: Callable[[int], None], cancel: threading.Event
) -> Packed:
    """Hash the database and (with zstd) compress it beside itself, hashing the output."""
    try:
        with copy.open("rb") as src:
            reader = _HashingReader(src, advance, cancel)
            if compression == "none":
                while reader.read(CHUNK):
                    pass
                sha = reader.sha.hexdigest()
                return Packed(copy, reader.size, sha, reader.size, sha)
            out_path = copy.with_name(copy.name + ".zst")
            with out_path.open("wb") as out:
                writer = _HashingWriter(out)
                cctx = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=ZSTD_THREADS)
                cctx.copy_stream(
                    cast(IO[bytes], reader), cast(IO[bytes], writer),
                    size=copy.stat().st_size, read_size=CHUNK, write_size=CHUNK,
                )
        return Packed(
            out_path, reader.size, reader.sha.hexdigest(), writer.size, writer.sha.hexdigest()
        )
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DiskFull("compress") from exc
        raise


def check_object(manifest: Manifest, size: int, sha256: str | None) -> None:
    """Raise VerificationError unless a stored object matches what the manifest records."""
    if size != manifest.stored_bytes:
        raise VerificationError(
            manifest.id, "size", f"stored object has {size} bytes, expected {manifest.stored_bytes}"
        )
    if sha256 is not None and sha256 != manifest.stored_sha256:
        raise VerificationError(
            manifest.id, "sha256",
            f"stored object has sha256 {sha256}, expected {manifest.stored_sha256}",
        )


def check_sound(db: Path) -> str:
    """``PRAGMA integrity_check`` of a finished copy: "" when sound, else the first problems."""
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None)
        try:
            # integrity_check revisits pages; past the default 2 MB cache it re-reads them. A
            # 16 MB cache halves its time on a 150 MB database and keeps memory flat.
            conn.execute("PRAGMA cache_size = -16384")
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return "" if rows == ["ok"] else "; ".join(rows[:5])
