"""A snapshot store in a local or mounted directory.

Keys map to paths below the root ("snapshots/x.json" -> ROOT/snapshots/x.json). An upload is
written to a hidden temp file in the destination directory, fsynced, renamed over the final name
with ``os.replace`` and the directory fsynced, so a reader sees the old object or the new one,
never part of one. Blocking I/O runs in worker threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from io import BufferedReader
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageUnavailable

from .base import ObjectInfo
from .streaming import ObjectStream

CHUNK = 1024 * 1024
_T = TypeVar("_T")


class _LocalError(Exception):
    """An error about the caller's local file, passed through untranslated."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error
TEMP_PREFIX = ".tmp-"


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    if parts[-1].startswith(TEMP_PREFIX):
        raise ValueError(f"object key may not start with {TEMP_PREFIX!r}: {key!r}")
    return key


def _copy_hashing(src: BufferedReader, out: BinaryIO, digest: Any) -> int:
    """Copy ``src`` into ``out`` in chunks, feeding ``digest``; returns the bytes copied."""
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while n := src.readinto(buf):
        out.write(view[:n])
        digest.update(view[:n])
        size += n
    return size


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


class _FileStream:
    """An open object file read from a worker thread (see :mod:`.streaming`)."""

    def __init__(self, fh: BufferedReader, size: int, store: FileStore, key: str) -> None:
        self.size = size
        self._fh = fh
        self._store = store
        self._key = key

    def read(self, n: int) -> bytes:
        return self._store._guard(self._key, self._fh.read, n)

    def close(self) -> None:
        self._fh.close()


class FileStore:
    name = "file"

    def __init__(self, root: str | Path) -> None:
        if not str(root):
            raise ValueError("snapshot.file.path is empty")
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*_check_key(key).split("/"))

    def _translate(self, exc: OSError, key: str) -> Exception:
        if isinstance(exc, FileNotFoundError | NotADirectoryError):
            if self._root_usable():
                return ObjectNotFound(key)
            return StorageUnavailable(f"file store {self.root} is not a usable directory")
        if isinstance(exc, PermissionError):
            return StorageAuthError(f"file store {self.root}: permission denied for {key}")
        if exc.errno == errno.ENOSPC:
            return StorageUnavailable(f"file store {self.root}: no space left on device ({key})")
        return StorageUnavailable(f"file store {self.root}: {key}: {exc.strerror or exc}")

    def _guard(self, key: str, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn`` (in a worker thread) translating OS errors into store errors."""
        try:
            return fn(*args)
        except _LocalError as exc:
            raise exc.error from None
        except OSError as exc:
            raise self._translate(exc, key) from exc

    def _root_usable(self) -> bool:
        """The root is a directory, or does not exist yet below a directory."""
        for path in (self.root, *self.root.parents):
            if path.exists():
                return path.is_dir()
        return True

    def _info(self, key: str, path: Path, sha256: str | None = None) -> ObjectInfo:
        st = path.stat()
        return ObjectInfo(key, st.st_size, sha256, datetime.fromtimestamp(st.st_mtime, UTC))

    # -- upload -------------------------------------------------------------------------------

    def _write_atomic(self, key: str, source: Path | bytes) -> ObjectInfo:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f"{TEMP_PREFIX}{dest.name}.{uuid.uuid4().hex}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(tmp, "xb") as out:
                if isinstance(source, bytes):
                    out.write(source)
                    digest.update(source)
                    size = len(source)
                else:
                    with open(source, "rb") as src:
                        size = _copy_hashing(src, out, digest)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(dest.parent)
        info = self._info(key, dest, digest.hexdigest())
        return ObjectInfo(key, size, info.sha256, info.modified)

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        return await asyncio.to_thread(self._guard, key, self._write_atomic, key, Path(path))

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return await asyncio.to_thread(self._guard, key, self._write_atomic, key, bytes(data))

    # -- download -----------------------------------------------------------------------------

    def _copy_out(self, key: str, dest: Path) -> ObjectInfo:
        src_path = self._path(key)
        if src_path.is_dir():
            raise ObjectNotFound(key)
        digest = hashlib.sha256()
        with open(src_path, "rb") as src:
            st = os.fstat(src.fileno())
            try:
                out = open(dest, "wb")  # noqa: SIM115 - local errors are not store errors
            except OSError as exc:
                raise _LocalError(exc) from exc
            with out:
                size = _copy_hashing(src, out, digest)
        return ObjectInfo(key, size, digest.hexdigest(), datetime.fromtimestamp(st.st_mtime, UTC))

    def _read(self, key: str) -> bytes:
        path = self._path(key)
        if path.is_dir():
            raise ObjectNotFound(key)
        return path.read_bytes()

    async def download(self, key: str, path: Path) -> ObjectInfo:
        return await asyncio.to_thread(self._guard, key, self._copy_out, key, Path(path))

    async def download_bytes(self, key: str) -> bytes:
        return await asyncio.to_thread(self._guard, key, self._read, key)

    def _open_read(self, key: str) -> _FileStream:
        path = self._path(key)
        if path.is_dir():
            raise ObjectNotFound(key)
        fh = open(path, "rb")  # noqa: SIM115 - the stream owns it and closes it
        return _FileStream(fh, os.fstat(fh.fileno()).st_size, self, key)

    async def open_stream(self, key: str) -> ObjectStream:
        """The object read in place: no copy into a temp file first."""
        return await asyncio.to_thread(self._guard, key, self._open_read, key)

    # -- metadata -----------------------------------------------------------------------------

    def _stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        if path.is_dir():
            raise ObjectNotFound(key)
        return self._info(key, path)

    async def stat(self, key: str) -> ObjectInfo:
        return await asyncio.to_thread(self._guard, key, self._stat, key)

    def _walk(self, prefix: str) -> list[ObjectInfo]:
        if not self._root_usable():
            raise StorageUnavailable(f"file store {self.root} is not a usable directory")
        out: list[ObjectInfo] = []
        # Only descend into the directory the prefix names (or the root).
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.root.joinpath(*base_rel.split("/")) if base_rel else self.root
        if not base.is_dir():
            return out
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.startswith(TEMP_PREFIX):
                    continue
                full = Path(dirpath) / fname
                key = full.relative_to(self.root).as_posix()
                if not key.startswith(prefix):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out.append(self._info(key, full))
        out.sort(key=lambda i: i.key)
        return out

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await asyncio.to_thread(self._guard, prefix, self._walk, prefix)

    def _remove(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except (FileNotFoundError, IsADirectoryError):
            return
        _fsync_dir(path.parent)

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._guard, key, self._remove, key)

    async def aclose(self) -> None:
        return None
