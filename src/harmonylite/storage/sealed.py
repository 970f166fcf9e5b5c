"""Sealing at rest: a store wrapper that age-encrypts what it writes and opens what it reads.

:func:`~harmonylite.storage.open_store` wraps every backend in a :class:`SealedStore`,
so every object written through the store protocol (snapshot data, archive segments, anything
later) is sealed when ``[snapshot.encryption] recipients`` is set, and every object read is
opened when it is sealed, whatever this node's own setting: sealed and plain objects live side by
side, and a sealed one is recognised by the age header it starts with. The stored object is a
plain age file (X25519 recipients, binary), so ``age -d -i key.txt`` opens it too.

Objects whose key ends in ``.json`` (manifests) are never sealed: every node must be able to
list and order snapshots without a secret, so manifests carry no row data (see
:mod:`harmonylite.snapshot.sealing` for the parts of a snapshot manifest that are sealed inside
it).

Beside each sealed object, ``{key}.sealed.json`` (hidden from listings) records the recipients'
public keys, so that a node that cannot open the object can say whom it was sealed to, and the
size and SHA-256 of the plaintext. Callers see the plaintext: ``upload`` and ``stat`` report
its size and hash (the manifests' ``stored_bytes``/``stored_sha256`` describe the object before
sealing), ``download`` writes it; ``open_stream`` streams plain objects only. Only ``list``
reports sizes as stored. Sealing and opening stream in chunks (age's 64 KiB frames): memory
does not grow with the object; the sealed copy is written beside the file being uploaded (or
downloaded) and removed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import pyrage

from harmonylite.age_keys import Keys
from harmonylite.errors import (
    NoSpaceError,
    ObjectNotFound,
    SealedObjectDamaged,
    SealError,
    StorageError,
)

from .base import ObjectInfo, ObjectStore
from .streaming import ObjectStream, Prefixed, open_stream

MAGIC = b"age-encryption.org/v1\n"
SEAL_SUFFIX = ".sealed.json"
PLAIN_SUFFIX = ".json"
SCHEME = "age-x25519"
SEAL_FORMAT = 1
_NO_MATCH = "No matching keys found"


def is_sealed(data: bytes) -> bool:
    """True when ``data`` (an object, or its first bytes) is an age file."""
    return data.startswith(MAGIC)


def seal_key(key: str) -> str:
    """Where the record of a sealed object's recipients is kept."""
    return key + SEAL_SUFFIX


@dataclass(frozen=True)
class Seal:
    """The record stored beside a sealed object (public facts only)."""

    recipients: list[str]
    plain_bytes: int
    plain_sha256: str
    sealed_bytes: int
    sealed_sha256: str

    def to_json(self) -> bytes:
        return json.dumps({"format": SEAL_FORMAT, "scheme": SCHEME, **self.__dict__},
                          indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes) -> Seal | None:
        try:
            data = json.loads(raw)
            return cls([str(r) for r in data["recipients"]], int(data["plain_bytes"]),
                       str(data["plain_sha256"]), int(data["sealed_bytes"]),
                       str(data["sealed_sha256"]))
        except (ValueError, KeyError, TypeError):
            return None


class _Reader:
    """Counts and hashes what age reads."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.size, self.sha = fh, 0, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.size += len(data)
        self.sha.update(data)
        return data


class _Writer:
    """Counts and hashes what age writes, and keeps the first write error: pyrage drops an
    error raised while it flushes its last frame, which would pass a short file for a whole one."""

    def __init__(self, fh: BinaryIO) -> None:
        self.fh, self.size, self.sha = fh, 0, hashlib.sha256()
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            n = self.fh.write(data)
        except BaseException as exc:
            self.error = self.error or exc
            raise
        self.size += len(data)
        self.sha.update(data)
        return n

    def flush(self) -> None:
        self.fh.flush()


def _seal_file(src: Path, dst: Path, sealers: list[Any], recipients: list[str]) -> Seal:
    with src.open("rb") as fin, dst.open("wb") as fout:
        reader, writer = _Reader(fin), _Writer(fout)
        try:
            pyrage.encrypt_io(reader, writer, sealers)
        except pyrage.EncryptError:
            if writer.error is not None:
                raise writer.error from None
            raise
        if writer.error is not None:
            raise writer.error
    if dst.stat().st_size != writer.size:
        raise StorageError(f"sealing {src} wrote {dst.stat().st_size} bytes, "
                           f"expected {writer.size}")
    return Seal(recipients, reader.size, reader.sha.hexdigest(), writer.size,
                writer.sha.hexdigest())


class _Damaged(Exception):
    """age's stream failed its authentication (reported by pyrage as an OSError without errno)."""


def _open_file(src: Path, dst: Path, identities: list[Any]) -> tuple[int, str]:
    with src.open("rb") as fin, dst.open("wb") as fout:
        writer = _Writer(fout)
        try:
            pyrage.decrypt_io(fin, writer, identities)
        except OSError as exc:
            if writer.error is not None:
                raise writer.error from None
            if exc.errno is None:
                raise _Damaged(str(exc)) from None
            raise
        if writer.error is not None:
            raise writer.error
    return writer.size, writer.sha.hexdigest()


def _file_is_sealed(path: Path) -> bool:
    with path.open("rb") as fh:
        return is_sealed(fh.read(len(MAGIC)))


def _room(path: Path) -> tuple[int, int]:
    """Bytes a sealed copy of ``path`` needs beside it, and bytes free there."""
    return path.stat().st_size, shutil.disk_usage(path.parent).free


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


class SealedStore:
    """Seals on the way in (when it has recipients), opens on the way out (with identities)."""

    def __init__(self, inner: ObjectStore, keys: Keys | None = None) -> None:
        self.inner = inner
        self.keys = keys or Keys()
        self.name = inner.name
        self._sealers = self.keys.sealers()

    @property
    def seals(self) -> bool:
        return bool(self._sealers)

    @property
    def recipients(self) -> list[str]:
        return list(self.keys.recipients)

    def _sealable(self, key: str) -> bool:
        return self.seals and not key.endswith(PLAIN_SUFFIX)

    # -- small objects ------------------------------------------------------------------------

    def seal_bytes(self, data: bytes) -> bytes:
        """``data`` sealed to this node's recipients (it must have some)."""
        if not self._sealers:
            raise SealError("(data to seal)", [], "no recipients configured")
        return bytes(pyrage.encrypt(data, self._sealers))

    def open_bytes(self, data: bytes, what: str, recipients: list[str] | None) -> bytes:
        """Open ``data`` sealed to ``recipients``; errors name ``what`` and them."""
        if not self.keys.identities:
            raise self._no_identity(what, recipients)
        try:
            return bytes(pyrage.decrypt(data, list(self.keys.identities)))
        except pyrage.DecryptError as exc:
            raise self._cannot_open(what, recipients, exc) from None

    def _no_identity(self, what: str, recipients: list[str] | None) -> SealError:
        return SealError(what, recipients, "this node has no identity to open it: set "
                         "[snapshot.encryption] identity_file to a file holding the identity of "
                         "one of those recipients")

    def _cannot_open(self, what: str, recipients: list[str] | None,
                     exc: pyrage.DecryptError) -> Exception:
        if _NO_MATCH in str(exc):
            n = len(self.keys.identities)
            return SealError(what, recipients, f"none of the {n} identities in "
                             f"{self.keys.identity_file} matches it (add the identity of one of "
                             "those recipients to that file)")
        return SealedObjectDamaged(what, f"age cannot open it ({exc}): corrupted or truncated")

    async def _recorded(self, key: str) -> Seal | None:
        try:
            return Seal.from_json(await self.inner.download_bytes(seal_key(key)))
        except ObjectNotFound:
            return None

    async def _recipients_of(self, key: str) -> list[str] | None:
        seal = await self._recorded(key)
        return seal.recipients if seal else None

    # -- the store protocol -------------------------------------------------------------------

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        if not self._sealable(key):
            return await self.inner.upload(key, path)
        sealed = path.with_name(f".{path.name}.sealing-{secrets.token_hex(4)}")
        try:
            try:
                seal = await asyncio.to_thread(_seal_file, path, sealed, self._sealers,
                                               self.recipients)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                # The sealed copy needs about as much room as the file it seals, beside it.
                await asyncio.to_thread(_unlink, sealed)
                needed, free = await asyncio.to_thread(_room, path)
                raise NoSpaceError(str(path.parent), needed, free) from exc
            info = await self.inner.upload(key, sealed)
        finally:
            await asyncio.to_thread(_unlink, sealed)
        return await self._record(key, seal, info)

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        if not self._sealable(key):
            return await self.inner.upload_bytes(key, data)
        sealed = await asyncio.to_thread(self.seal_bytes, data)
        info = await self.inner.upload_bytes(key, sealed)
        seal = Seal(self.recipients, len(data), hashlib.sha256(data).hexdigest(), len(sealed),
                    hashlib.sha256(sealed).hexdigest())
        return await self._record(key, seal, info)

    async def _record(self, key: str, seal: Seal, info: ObjectInfo) -> ObjectInfo:
        """Check what the store holds, write the seal record, report the plaintext."""
        if info.size != seal.sealed_bytes or info.sha256 not in (None, seal.sealed_sha256):
            raise StorageError(f"the store holds {info.size} bytes (sha256 {info.sha256}) for "
                               f"sealed object {key}, {seal.sealed_bytes} bytes (sha256 "
                               f"{seal.sealed_sha256}) were sent")
        await self.inner.upload_bytes(seal_key(key), seal.to_json())
        return ObjectInfo(key, seal.plain_bytes, seal.plain_sha256, info.modified)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        info = await self.inner.download(key, path)
        if not await asyncio.to_thread(_file_is_sealed, path):
            return info
        if not self.keys.identities:
            await asyncio.to_thread(_unlink, path)  # never leave ciphertext where plaintext goes
            raise self._no_identity(key, await self._recipients_of(key))
        sealed = path.with_name(f".{path.name}.sealed-{secrets.token_hex(4)}")
        os.replace(path, sealed)
        try:
            size, sha = await asyncio.to_thread(_open_file, sealed, path,
                                                list(self.keys.identities))
        except pyrage.DecryptError as exc:
            await asyncio.to_thread(_unlink, path)
            raise self._cannot_open(key, await self._recipients_of(key), exc) from None
        except _Damaged as exc:
            await asyncio.to_thread(_unlink, path)
            raise SealedObjectDamaged(key, f"age cannot open it ({exc}): corrupted or "
                                      "truncated") from None
        except BaseException:
            await asyncio.to_thread(_unlink, path)
            raise
        finally:
            await asyncio.to_thread(_unlink, sealed)
        return ObjectInfo(key, size, sha, info.modified)

    async def open_stream(self, key: str) -> ObjectStream | None:
        """The inner store's stream of a plain object; None for a sealed one (``download``
        opens it) or when the inner store cannot stream."""
        stream = await open_stream(self.inner, key)
        if stream is None:
            return None
        try:
            head = await asyncio.to_thread(stream.read, len(MAGIC))
        except BaseException:
            await asyncio.to_thread(stream.close)
            raise
        if is_sealed(head):
            await asyncio.to_thread(stream.close)
            return None
        return Prefixed(head, stream)

    async def download_bytes(self, key: str) -> bytes:
        data = await self.inner.download_bytes(key)
        if not is_sealed(data):
            return data
        if not self.keys.identities:
            raise self._no_identity(key, await self._recipients_of(key))
        try:
            return await asyncio.to_thread(pyrage.decrypt, data, list(self.keys.identities))
        except pyrage.DecryptError as exc:
            raise self._cannot_open(key, await self._recipients_of(key), exc) from None

    async def stat(self, key: str) -> ObjectInfo:
        info = await self.inner.stat(key)
        if key.endswith(PLAIN_SUFFIX):
            return info
        seal = await self._recorded(key)
        # A record that does not describe the object as stored (left by an earlier object under
        # the same key) says nothing about it.
        if seal is None or seal.sealed_bytes != info.size \
                or info.sha256 not in (None, seal.sealed_sha256):
            return info
        return ObjectInfo(key, seal.plain_bytes, seal.plain_sha256, info.modified)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return [i for i in await self.inner.list(prefix) if not i.key.endswith(SEAL_SUFFIX)]

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)
        if not key.endswith(PLAIN_SUFFIX):
            await self.inner.delete(seal_key(key))

    async def aclose(self) -> None:
        await self.inner.aclose()
