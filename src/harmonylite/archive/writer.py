"""The archive writer: on the snapshot leader, every stream's messages go into segments.

While this node holds the snapshot lease (term T), one task per stream lists the archive, reads
the stream from the sequence after the newest archived one (so a new leader continues exactly
where the last one stopped) and stores a segment whenever ``archive_interval`` passed since its
first message, or it reached ``SEGMENT_MESSAGES`` messages or ``SEGMENT_BYTES`` bytes. Each
segment's manifest is written only after the lease was confirmed for term T (the fence): a
leader that lost the lease never commits a segment. Losing the lease stops the tasks; what they
held unwritten is read again by the next leader.

A store that fails (an outage) is retried with a growing wait while the segment in hand is kept;
the stream is read on meanwhile up to a bounded queue. When the stream dropped messages before
they were archived (its retention passed them during a long outage), the writer says so once
(``archive gap``), records the gap for health and ``archive verify``, and continues from the
stream's first message: the archive is continuous again from the next snapshot on.

When a stream's archive reaches the stream's head, its *head* object records the time, so an
idle stream does not end the restorable window. Every ``PRUNE_SECONDS`` the leader deletes the
segments wholly before the oldest kept snapshot (snapshots themselves are kept for
``archive_retention`` by the snapshot pipeline).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext

from harmonylite.aio import Backoff, wait_any
from harmonylite.archive import catalog, segment
from harmonylite.archive.stream_tail import StreamTail
from harmonylite.bus.kv import describe
from harmonylite.errors import LeaseLost
from harmonylite.ops.metrics import Metrics
from harmonylite.snapshot.leader import LeaderElection
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.storage.base import ObjectStore

log = logging.getLogger(__name__)

SEGMENT_MESSAGES = 20_000
SEGMENT_BYTES = 16 * 1024 * 1024
RETRY_FIRST = 0.5
RETRY_MAX = 30.0
PRUNE_SECONDS = 300.0
INFO_TIMEOUT = 5.0

StoreOpener = Callable[[], Awaitable[ObjectStore]]


class Lease:
    """What the writer needs of the snapshot election."""

    def __init__(self, election: LeaderElection) -> None:
        self.election = election

    @property
    def term(self) -> int | None:
        return int(self.election.term) if self.election.is_leader else None

    async def confirm(self, term: int) -> None:
        await self.election.confirm(term)


class StreamState:
    """One stream's archive as health reports it."""

    def __init__(self) -> None:
        self.archived = 0  # the newest archived sequence (0: none known)
        self.head = 0  # the newest sequence the stream holds, as last seen
        self.gap: tuple[int, int] | None = None
        self.newest_us = 0  # server time of the newest archived message

    @property
    def lag(self) -> int:
        return max(0, self.head - self.archived)


class ArchiveWriter:
    def __init__(self, *, js: JetStreamContext, open_store: StoreOpener, lease: Lease,
                 streams: dict[str, str], node_id: int, interval_ms: int,
                 spool: Path | None = None, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.js = js
        self._open_store = open_store
        self.lease = lease
        self.streams = streams  # stream name -> subject
        self.node_id = node_id
        self.interval = max(0.05, interval_ms / 1000.0)
        self.spool = spool
        self.metrics = metrics
        self._clock = clock
        self.state = {s: StreamState() for s in streams}
        self.writing = False
        self.last_error: str | None = None
        self.segments_written = 0
        self._store: ObjectStore | None = None
        self._last_prune = -1e18

    # --- health -----------------------------------------------------------------------------
    def newest_segment_age(self) -> float | None:
        newest = max((st.newest_us for st in self.state.values()), default=0)
        return None if not newest else max(0.0, time.time() - newest / 1e6)

    def status(self) -> dict[str, Any]:
        age = self.newest_segment_age()
        return {
            "writing": self.writing,
            "newest_segment_age_seconds": None if age is None else round(age, 3),
            "last_error": self.last_error,
            "streams": {s: {"archived_sequence": st.archived, "lag_messages": st.lag,
                            "gap": list(st.gap) if st.gap else None}
                        for s, st in sorted(self.state.items())},
        }

    def _report(self, stream: str) -> None:
        if self.metrics is not None:
            self.metrics.archive_state(stream, self.state[stream].lag)

    # --- the loop ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        if self.metrics is not None:
            self.metrics.track_archive_age(self.newest_segment_age)
        # The first retry after 2 * RETRY_FIRST (the writer's own pace since it was written).
        backoff = Backoff(2 * RETRY_FIRST, RETRY_MAX)
        while not stop.is_set():
            term = self.lease.term
            if term is None:
                await wait_any(stop, timeout=0.5)
                continue
            try:
                await self._lead(term, stop)
                backoff.reset()
            except asyncio.CancelledError:
                raise
            except LeaseLost as exc:
                log.info("archive writer stopped: %s", exc)
            except Exception as exc:
                self._failed(f"archive writer: {describe(exc)}")
                await backoff.wait(stop)
            finally:
                self.writing = False

    def _failed(self, text: str) -> None:
        if self.last_error != text:
            log.warning("%s (retrying)", text)
        self.last_error = text

    async def store(self) -> ObjectStore:
        if self._store is None:
            self._store = await self._open_store()
        return self._store

    async def _lead(self, term: int, stop: asyncio.Event) -> None:
        store = await self.store()
        archives = await catalog.list_archive(store, list(self.streams))
        self.writing = True
        done = asyncio.Event()
        tasks = [asyncio.create_task(self._stream(term, s, archives[s], store, done))
                 for s in self.streams]
        try:
            while not stop.is_set() and self.lease.term == term:
                if any(t.done() for t in tasks):
                    for t in tasks:
                        if t.done() and t.exception() is not None:
                            raise t.exception()  # type: ignore[misc]
                if self._clock() - self._last_prune >= PRUNE_SECONDS:
                    self._last_prune = self._clock()
                    await self._prune(store)
                await wait_any(stop, timeout=0.2)
        finally:
            done.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _stream(self, term: int, stream: str, arch: catalog.StreamArchive,
                      store: ObjectStore, done: asyncio.Event) -> None:
        st = self.state[stream]
        st.archived = arch.last
        if arch.segments:
            st.newest_us = max(st.newest_us, max(s.last_us for s in arch.segments))
        info = await asyncio.wait_for(self.js.stream_info(stream), INFO_TIMEOUT)
        first_held, st.head = int(info.state.first_seq), int(info.state.last_seq)
        start = st.archived + 1 if st.archived else max(1, first_held)
        if st.archived and first_held > start:
            self._gap(stream, start, first_held - 1)
            start = first_held
        tail = StreamTail(self.js, stream, self.streams[stream], self.spool)
        tail.head = st.head
        await tail.start(start)
        try:
            await self._archive(term, stream, tail, store, done)
        finally:
            await tail.stop()

    def _gap(self, stream: str, first: int, last: int) -> None:
        self.state[stream].gap = (first, last)
        log.error("archive gap in %s: messages %d..%d left the stream before they were "
                  "archived; the archive is continuous again from the next snapshot", stream,
                  first, last, extra={"stream": stream, "from_seq": first, "to_seq": last})

    async def _archive(self, term: int, stream: str, tail: StreamTail, store: ObjectStore,
                       done: asyncio.Event) -> None:
        st = self.state[stream]
        held: list[segment.Message] = []
        size = 0
        since = 0.0  # when the first held message came
        last_head_write = -1e18
        while not done.is_set():
            timeout = self.interval if not held else max(0.0, since + self.interval
                                                        - self._clock())
            try:
                msg = await asyncio.wait_for(tail.queue.get(), timeout) if \
                    len(held) < SEGMENT_MESSAGES and size < SEGMENT_BYTES else None
            except TimeoutError:
                msg = None
            if msg is not None:
                expected = (held[-1].seq if held else st.archived) + 1
                if st.archived and msg.seq > expected:
                    if held:
                        await self._flush(term, stream, held, store)
                        held, size = [], 0
                    self._gap(stream, expected, msg.seq - 1)
                if not held:
                    since = self._clock()
                held.append(msg)
                size += len(msg.data)
                st.head = max(st.head, tail.head)
                self._report(stream)
                if len(held) < SEGMENT_MESSAGES and size < SEGMENT_BYTES \
                        and self._clock() - since < self.interval:
                    continue
            if held:
                await self._flush(term, stream, held, store)
                held, size = [], 0
            st.head = max(st.head, tail.head)
            self._report(stream)
            if tail.queue.empty() and st.archived >= tail.head \
                    and self._clock() - last_head_write >= self.interval:
                await self._write_head(term, stream, store)
                last_head_write = self._clock()

    async def _flush(self, term: int, stream: str, held: list[segment.Message],
                     store: ObjectStore) -> None:
        """Store ``held`` as one segment, retrying the store until it works or the lease goes."""
        data, manifest = segment.encode(stream, held, self.node_id)
        ref = manifest.ref
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)  # while the store is down
        failing = False
        while True:
            try:
                await store.upload_bytes(ref.data_key, data)
                await self.lease.confirm(term)
                await store.upload_bytes(ref.manifest_key, manifest.to_json())
                break
            except LeaseLost:
                raise
            except Exception as exc:
                self.last_error = f"archive segment {ref.data_key} not stored: {describe(exc)}"
                if not failing:  # once per outage, not per retry
                    log.warning("%s (the segment is kept and retried until the store takes "
                                "it)", self.last_error, extra={"stream": stream})
                failing = True
                await backoff.wait()
                if self.lease.term != term:
                    raise LeaseLost("snapshot lease lost while the store failed") from exc
        if failing:
            log.info("archive segments of %s are stored again", stream, extra={"stream": stream})
        self.last_error = None
        st = self.state[stream]
        st.archived = max(st.archived, ref.last)
        st.newest_us = max(st.newest_us, ref.last_us)
        self.segments_written += 1
        log.debug("archived %s %d..%d (%d bytes)", stream, ref.first, ref.last, len(data))

    async def _write_head(self, term: int, stream: str, store: ObjectStore) -> None:
        head = catalog.Head(stream, self.state[stream].archived,
                            segment.datetime_to_us(datetime.now(UTC)), self.node_id)
        try:
            await self.lease.confirm(term)
            await store.upload_bytes(catalog.head_key(stream), head.to_json())
        except LeaseLost:
            raise
        except Exception as exc:
            self._failed(f"archive head of {stream} not stored: {describe(exc)}")

    async def _prune(self, store: ObjectStore) -> None:
        """Delete segments no kept snapshot needs (manifest first: never a hole in a listing
        that someone reads meanwhile, only a shorter front)."""
        try:
            snapshots = await list_snapshots(store)
            archives = await catalog.list_archive(store, list(self.streams))
            doomed, orphans = catalog.prunable(snapshots, archives)
            for ref in sorted(doomed, key=lambda r: (r.stream, r.first)):
                await store.delete(ref.manifest_key)
                await store.delete(ref.data_key)
            for key in orphans:
                await store.delete(key)
            if doomed or orphans:
                log.info("deleted %d archive segments (and %d uncommitted data objects) older "
                         "than the oldest kept snapshot", len(doomed), len(orphans))
        except Exception as exc:
            self._failed(f"pruning the archive failed: {describe(exc)}")

    async def close(self) -> None:
        if self._store is not None:
            with contextlib.suppress(Exception):
                await self._store.aclose()
            self._store = None
