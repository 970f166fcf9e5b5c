"""The protocol every snapshot store implements, and what it returns.

Keys are relative ("snapshots/{id}.json"); each backend maps them under its own root (bucket and
path prefix, directory, object-store bucket). Uploads are atomic: no reader ever sees part of an
object. SDK errors are translated at the backend's edge into ObjectNotFound, StorageUnavailable
or StorageAuthError, with credentials redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None  # hex, when the store keeps or reports it
    modified: datetime | None


class ObjectStore(Protocol):
    name: str  # "nats", "s3", "sftp", "webdav" or "file"

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        """Store the file at ``path`` under ``key`` atomically; stream it, never read it whole."""
        ...

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        """Store a small object (a manifest) atomically."""
        ...

    async def download(self, key: str, path: Path) -> ObjectInfo:
        """Write the object into ``path`` (streaming); raises ObjectNotFound."""
        ...

    async def download_bytes(self, key: str) -> bytes:
        """Read a small object (a manifest) whole; raises ObjectNotFound."""
        ...

    async def stat(self, key: str) -> ObjectInfo:
        """Size (and hash where known) of an object; raises ObjectNotFound."""
        ...

    async def list(self, prefix: str) -> list[ObjectInfo]:
        """Objects whose key starts with ``prefix``; an empty list when there are none."""
        ...

    async def delete(self, key: str) -> None:
        """Remove an object; deleting a missing key is not an error."""
        ...

    async def aclose(self) -> None: ...
