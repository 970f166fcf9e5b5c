"""Reading a stored object as a stream, so that a restore downloads, decompresses, hashes and
writes in one pass instead of downloading to a temp file first.

A store that can stream has ``open_stream(key)`` (:class:`Streaming`); it returns an
:class:`ObjectStream`, read with blocking ``read`` calls from a worker thread, or None when this
object must go through ``download`` (a sealed object: the age layer opens files). The caller
checks what it reads (size and SHA-256 against the manifest): a stream promises nothing about
its bytes, and an object replaced or cut short while it is read shows up there.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol, runtime_checkable

from .base import ObjectStore

# At most PARTS_AHEAD parts are fetched or waiting, plus the one being read: ~16 MB. Larger
# parts (4 x 8 MB) took a 1 GB restore to ~150 MB peak RSS and were slower, not faster: the
# decompressor, not the loopback transfer, sets the pace on two cores.
PART_BYTES = 4 * 1024 * 1024
PARTS_AHEAD = 3


class ObjectStream(Protocol):
    size: int  # the object's size as the store reported it when the stream was opened

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (blocking); ``b""`` at the end. Store errors are StorageError."""
        ...

    def close(self) -> None:
        """Stop reading and release what the stream holds; safe to call twice."""
        ...


@runtime_checkable
class Streaming(Protocol):
    async def open_stream(self, key: str) -> ObjectStream | None: ...


async def open_stream(store: ObjectStore, key: str) -> ObjectStream | None:
    """A stream of ``key`` when ``store`` can stream it, else None (use ``download``)."""
    if isinstance(store, Streaming):
        return await store.open_stream(key)
    return None


class PartStream:
    """An object read as consecutive ranges, ``ahead`` of them in flight at once on worker
    threads, handed out in order: memory stays at ``ahead`` parts whatever the object's size,
    and the transfer overlaps with what the reader does with the bytes.

    ``fetch(offset, length)`` returns the bytes of one range; a range shorter than asked ends
    the stream there (the object changed or was cut short: the caller's size check names it).
    """

    def __init__(self, size: int, fetch: Callable[[int, int], bytes], *,
                 part_bytes: int = PART_BYTES, ahead: int = PARTS_AHEAD,
                 name: str = "stream") -> None:
        self.size = size
        self._fetch = fetch
        self._part = part_bytes
        self._pool = ThreadPoolExecutor(max_workers=ahead, thread_name_prefix=name)
        self._pending: deque[tuple[int, Future[bytes]]] = deque()
        self._next = 0
        self._buf = memoryview(b"")
        self._ended = False
        self._lock = threading.Lock()
        for _ in range(ahead):
            self._submit()

    def _submit(self) -> None:
        if self._ended or self._next >= self.size:
            return
        length = min(self._part, self.size - self._next)
        self._pending.append((length, self._pool.submit(self._fetch, self._next, length)))
        self._next += length

    def read(self, n: int) -> bytes:
        with self._lock:
            if not self._buf:
                if self._ended or not self._pending:
                    return b""
                length, fut = self._pending.popleft()
                data = fut.result()  # a store error propagates to the reader
                if len(data) < length:
                    self._stop()
                else:
                    self._submit()
                self._buf = memoryview(data)
            out = bytes(self._buf[:n])
            self._buf = self._buf[n:]
            return out

    def _stop(self) -> None:
        self._ended = True
        while self._pending:
            self._pending.popleft()[1].cancel()

    def close(self) -> None:
        with self._lock:
            self._stop()
            self._buf = memoryview(b"")
        self._pool.shutdown(wait=True)  # parts being read finish; nothing is left running


class Prefixed:
    """``head`` (already read from ``stream``) followed by the rest of ``stream``."""

    def __init__(self, head: bytes, stream: ObjectStream) -> None:
        self.size = stream.size
        self._head = head
        self._stream = stream

    def read(self, n: int) -> bytes:
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._stream.read(n)

    def close(self) -> None:
        self._stream.close()
