"""Large payloads kept in files beside the database instead of in memory.

A change with a large value (a 50 MB blob) used to be copied whole at every step: encoded, then
compressed, downloaded as a list of chunks, joined, decompressed, decoded. A :class:`Spooled`
payload is written and read in pieces, so a node holds about one copy of the value itself.

The files live in the database's directory (a temporary directory may be a RAM disk), named
``.harmonylite-spool-*``; each is removed when its payload is closed or garbage-collected, and
files left by a process that died are removed the first time a process spools in that directory.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

PREFIX = ".harmonylite-spool-"
_swept: set[Path] = set()
_sweep_lock = threading.Lock()


def _sweep(directory: Path) -> None:
    """Remove files left by a process that died (each directory once per process)."""
    with _sweep_lock:
        if directory in _swept:
            return
        _swept.add(directory)
    for path in directory.glob(PREFIX + "*"):
        try:
            path.unlink()
            log.info("removed %s, a large payload left by a process that stopped", path)
        except FileNotFoundError:
            pass


class Spooled:
    """A payload in a file of its own: written once, then read (any number of times)."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        _sweep(directory)
        fd, name = tempfile.mkstemp(prefix=PREFIX, dir=directory)
        self.path = Path(name)
        self.file: BinaryIO = os.fdopen(fd, "w+b")
        self.size = 0
        self._sha = hashlib.sha256()
        self._digest: str | None = None  # known from elsewhere (see ``adopt``)
        self._finalizer = weakref.finalize(self, _remove, self.file, self.path)

    # -- writing (a file-like sink for zstandard and the CBOR writer) --------------------------

    def write(self, data: bytes | memoryview) -> int:
        n = self.file.write(data)
        self._sha.update(data)
        self.size += n
        return n

    def writable(self) -> bool:
        return True

    def flush(self) -> None:
        self.file.flush()

    @property
    def sha256(self) -> str:
        return self._digest or self._sha.hexdigest()

    # -- reading ------------------------------------------------------------------------------

    def reader(self) -> BinaryIO:
        """The file from its start (one reader at a time)."""
        self.file.flush()
        self.file.seek(0)
        return self.file

    def read(self) -> bytes:
        """The whole payload in memory (for a small one, or a rare path such as a dead letter)."""
        return self.reader().read()

    def adopt(self, size: int, sha256: str) -> None:
        """Written by someone else through :attr:`path` (a download): take its size and hash."""
        self.size = size
        self._digest = sha256

    def close(self) -> None:
        self._finalizer()

    def __len__(self) -> int:
        return self.size


def _remove(file: BinaryIO, path: Path) -> None:
    file.close()
    path.unlink(missing_ok=True)


Payload = bytes | Spooled


def held_bytes(data: Payload) -> int:
    """Bytes of memory a payload holds (a spooled one: none)."""
    return 0 if isinstance(data, Spooled) else len(data)


def as_bytes(data: Payload) -> bytes:
    return data.read() if isinstance(data, Spooled) else data
