"""A snapshot store on an SFTP server (asyncssh).

``url`` is ``sftp://user:pass@host:port/path``; ``key_file`` may replace or complement the
password. Host keys are checked against ``known_hosts`` (default ``~/.ssh/known_hosts``) unless
``insecure_ignore_host_key`` is set. One connection is kept open and re-opened after a failure.
An upload is written to a hidden temp name in the destination directory and renamed over the
final name (the OpenSSH posix-rename extension when the server has it, else remove + rename).
The password never appears in an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import posixpath
import stat as statmod
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import unquote, urlsplit

import asyncssh

from harmonylite.config import SftpConfig
from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageError, StorageUnavailable
from harmonylite.redact import redact

from .base import ObjectInfo

_T = TypeVar("_T")
CHUNK = 1024 * 1024
TEMP_PREFIX = ".tmp-"
CONNECT_TIMEOUT = 15.0


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    return key


def _modified(attrs: asyncssh.SFTPAttrs) -> datetime | None:
    return datetime.fromtimestamp(attrs.mtime, UTC) if attrs.mtime is not None else None


class SftpStore:
    name = "sftp"

    def __init__(self, cfg: SftpConfig, *, connect_timeout: float = CONNECT_TIMEOUT) -> None:
        url = urlsplit(cfg.url)
        if url.scheme != "sftp" or not url.hostname:
            raise ValueError("snapshot.sftp.url must look like sftp://user@host:port/path")
        self.host = url.hostname
        self.port = url.port or 22
        self.username = unquote(url.username) if url.username else None
        self._password = unquote(url.password) if url.password is not None else None
        self.root = unquote(url.path) or "."
        if self.root != "/":
            self.root = self.root.rstrip("/")
        self.key_file = os.path.expanduser(cfg.key_file) if cfg.key_file else ""
        self.known_hosts: str | None = None
        if not cfg.insecure_ignore_host_key:
            self.known_hosts = os.path.expanduser(cfg.known_hosts or "~/.ssh/known_hosts")
        self.connect_timeout = connect_timeout
        self._conn: asyncssh.SSHClientConnection | None = None
        self._sftp: asyncssh.SFTPClient | None = None
        self._lock = asyncio.Lock()
        self._made_dirs: set[str] = set()

    @classmethod
    async def open(cls, cfg: SftpConfig) -> SftpStore:
        return cls(cfg)

    @property
    def where(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"sftp://{user}{self.host}:{self.port}{self.root if self.root != '.' else ''}"

    def _clean(self, text: str) -> str:
        if self._password:
            text = text.replace(self._password, "***")
        return redact(text)

    # -- connection ---------------------------------------------------------------------------

    async def _client(self) -> asyncssh.SFTPClient:
        async with self._lock:
            if self._sftp is not None:
                return self._sftp
            options: dict[str, Any] = {
                "port": self.port,
                "known_hosts": self.known_hosts,
                "connect_timeout": self.connect_timeout,
                "login_timeout": self.connect_timeout,
                "agent_path": None,
            }
            if self.username:
                options["username"] = self.username
            if self._password is not None:
                options["password"] = self._password
            if self.key_file:
                options["client_keys"] = [self.key_file]
            elif self._password is not None:
                options["client_keys"] = []
            conn = await asyncio.wait_for(
                asyncssh.connect(self.host, **options), self.connect_timeout + 5
            )
            try:
                sftp = await asyncio.wait_for(conn.start_sftp_client(), self.connect_timeout)
            except BaseException:
                conn.close()
                raise
            self._conn, self._sftp = conn, sftp
            return sftp

    async def _drop(self) -> None:
        conn, self._conn, self._sftp = self._conn, None, None
        self._made_dirs.clear()
        if conn is not None:
            conn.close()
            with contextlib.suppress(TimeoutError, OSError, asyncssh.Error):
                await asyncio.wait_for(conn.wait_closed(), 5)

    def _translate(self, exc: BaseException, key: str) -> StorageError:
        if isinstance(exc, asyncssh.SFTPNoSuchFile):
            return ObjectNotFound(key)
        if isinstance(exc, asyncssh.SFTPPermissionDenied):
            return StorageAuthError(self._clean(f"{self.where}: permission denied on {key}"))
        if isinstance(exc, asyncssh.PermissionDenied):
            return StorageAuthError(self._clean(f"{self.where}: login refused ({exc.reason})"))
        if isinstance(exc, asyncssh.HostKeyNotVerifiable):
            return StorageAuthError(
                self._clean(f"{self.where}: host key not verified against {self.known_hosts}")
            )
        if isinstance(exc, asyncssh.SFTPError):
            return StorageUnavailable(self._clean(f"{self.where}: {key}: {exc.reason}"))
        if isinstance(exc, TimeoutError):
            return StorageUnavailable(self._clean(f"{self.where}: timed out"))
        reason = getattr(exc, "reason", "") or getattr(exc, "strerror", "") or str(exc)
        return StorageUnavailable(self._clean(f"{self.where} unreachable: {reason}"))

    async def _run(self, key: str, op: Callable[[asyncssh.SFTPClient], Awaitable[_T]]) -> _T:
        """Run ``op`` with the shared client; reconnect once when the connection broke."""
        for attempt in (1, 2):
            had_conn = self._sftp is not None
            try:
                sftp = await self._client()
                return await op(sftp)
            except asyncssh.SFTPError as exc:
                if isinstance(exc, asyncssh.SFTPConnectionLost) and attempt == 1:
                    await self._drop()
                    continue
                raise self._translate(exc, key) from exc
            except (asyncssh.PermissionDenied, asyncssh.HostKeyNotVerifiable) as exc:
                await self._drop()
                raise self._translate(exc, key) from exc
            except (asyncssh.Error, OSError, TimeoutError, EOFError) as exc:
                if isinstance(exc, OSError) and exc.filename is not None:
                    raise  # a local file problem, not the store's
                await self._drop()
                if attempt == 1 and had_conn and _was_connected(exc):
                    continue
                raise self._translate(exc, key) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    # -- paths --------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return posixpath.join(self.root, *_check_key(key).split("/"))

    async def _makedirs(self, sftp: asyncssh.SFTPClient, directory: str) -> None:
        if directory in self._made_dirs:
            return
        await sftp.makedirs(directory, exist_ok=True)
        self._made_dirs.add(directory)

    async def _replace(self, sftp: asyncssh.SFTPClient, tmp: str, dest: str) -> None:
        try:
            await sftp.posix_rename(tmp, dest)
            return
        except asyncssh.SFTPOpUnsupported:
            pass
        with contextlib.suppress(asyncssh.SFTPNoSuchFile):
            await sftp.remove(dest)
        await sftp.rename(tmp, dest)

    # -- protocol -----------------------------------------------------------------------------

    async def _put(self, key: str, chunks: Callable[[], Awaitable[bytes]]) -> ObjectInfo:
        dest = self._path(key)
        directory = posixpath.dirname(dest)

        async def op(sftp: asyncssh.SFTPClient) -> ObjectInfo:
            await self._makedirs(sftp, directory)
            tmp_name = f"{TEMP_PREFIX}{posixpath.basename(dest)}.{uuid.uuid4().hex}"
            tmp = posixpath.join(directory, tmp_name)
            digest = hashlib.sha256()
            size = 0
            try:
                async with sftp.open(tmp, "wb") as remote:
                    while data := await chunks():
                        await remote.write(data, size)
                        digest.update(data)
                        size += len(data)
                await self._replace(sftp, tmp, dest)
            except BaseException:
                with contextlib.suppress(asyncssh.Error, OSError):
                    await asyncio.shield(sftp.remove(tmp))
                raise
            attrs = await sftp.stat(dest)
            return ObjectInfo(key, size, digest.hexdigest(), _modified(attrs))

        return await self._run(key, op)

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            return await self._put(key, lambda: asyncio.to_thread(fh.read, CHUNK))
        finally:
            await asyncio.to_thread(fh.close)

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        parts = [bytes(data), b""]

        async def next_part() -> bytes:
            return parts.pop(0) if parts else b""

        return await self._put(key, next_part)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        src = self._path(key)

        async def op(sftp: asyncssh.SFTPClient) -> ObjectInfo:
            digest = hashlib.sha256()
            size = 0
            async with sftp.open(src, "rb") as remote:
                attrs = await remote.stat()
                fh = await asyncio.to_thread(open, path, "wb")
                try:
                    while data := cast(bytes, await remote.read(CHUNK, size)):
                        await asyncio.to_thread(fh.write, data)
                        digest.update(data)
                        size += len(data)
                finally:
                    await asyncio.to_thread(fh.close)
            return ObjectInfo(key, size, digest.hexdigest(), _modified(attrs))

        return await self._run(key, op)

    async def download_bytes(self, key: str) -> bytes:
        src = self._path(key)

        async def op(sftp: asyncssh.SFTPClient) -> bytes:
            async with sftp.open(src, "rb") as remote:
                data: bytes = await remote.read()
                return data

        return await self._run(key, op)

    async def stat(self, key: str) -> ObjectInfo:
        src = self._path(key)

        async def op(sftp: asyncssh.SFTPClient) -> ObjectInfo:
            attrs = await sftp.stat(src)
            if attrs.permissions is not None and not statmod.S_ISREG(attrs.permissions):
                raise ObjectNotFound(key)
            return ObjectInfo(key, attrs.size or 0, None, _modified(attrs))

        return await self._run(key, op)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        base_rel = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = posixpath.join(self.root, *base_rel.split("/")) if base_rel else self.root

        async def walk(sftp: asyncssh.SFTPClient, directory: str, rel: str) -> list[ObjectInfo]:
            out: list[ObjectInfo] = []
            try:
                names = [n async for n in sftp.scandir(directory)]
            except asyncssh.SFTPNoSuchFile:
                return out
            for entry in names:
                name = str(entry.filename)
                if name in (".", "..") or name.startswith(TEMP_PREFIX):
                    continue
                key = f"{rel}{name}"
                perms = entry.attrs.permissions or 0
                if statmod.S_ISDIR(perms):
                    sub = key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        out.extend(await walk(sftp, posixpath.join(directory, name), sub))
                elif key.startswith(prefix) and (statmod.S_ISREG(perms) or not perms):
                    out.append(ObjectInfo(key, entry.attrs.size or 0, None, _modified(entry.attrs)))
            return out

        async def op(sftp: asyncssh.SFTPClient) -> list[ObjectInfo]:
            found = await walk(sftp, start, f"{base_rel}/" if base_rel else "")
            return sorted(found, key=lambda i: i.key)

        return await self._run(prefix, op)

    async def delete(self, key: str) -> None:
        dest = self._path(key)

        async def op(sftp: asyncssh.SFTPClient) -> None:
            with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                await sftp.remove(dest)

        await self._run(key, op)

    async def aclose(self) -> None:
        async with self._lock:
            await self._drop()


def _was_connected(exc: BaseException) -> bool:
    """A broken established connection (worth one reconnect), not a refused connect."""
    lost = (asyncssh.ConnectionLost, asyncssh.DisconnectError, EOFError, BrokenPipeError)
    return isinstance(exc, lost)
