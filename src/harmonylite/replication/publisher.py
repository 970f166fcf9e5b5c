"""Publishing pending changes: detect, read a batch, encode per shard, publish, then mark.

A batch stays in memory until every one of its messages is acknowledged; a retry resends only the
unacknowledged ones, each with the same ``Nats-Msg-Id`` so JetStream drops a copy that was stored
after all (DESIGN rule 11). The watermark moves only after the whole batch is acknowledged.

The last change id of the batch is recorded before it is sent. If the process dies between the
acknowledgement and the watermark, the next start re-sends exactly that batch, cut the same way,
so the message ids repeat and JetStream's duplicate window (2 minutes) drops the copies instead of
appending old row states after newer ones.

Messages are cut under the server's ``max_payload`` (learned from the connection's INFO); a message
that still does not fit (one large change) is carried out of band, see ``large_changes``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from harmonylite.aio import wait_any
from harmonylite.cdc import changelog, ddl
from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.cdc.rows import RowReader
from harmonylite.cdc.schema import fold_key
from harmonylite.config import Config
from harmonylite.db.connection import DbThread, open_connection, write_transaction
from harmonylite.errors import StorageUnavailable
from harmonylite.ops.metrics import Metrics
from harmonylite.replication.event import encode, shard_of
from harmonylite.replication.large_changes import (
    REF_HEADER,
    LargeChangeStore,
    describe,
    server_limit,
    split_by_size,
)

log = logging.getLogger(__name__)

# An acknowledgement normally takes milliseconds, even from an R3 stream; one that has not come
# in 2 s was lost with a server or a leader (a retry is safe: the message id de-duplicates it).
ACK_TIMEOUT = 2.0
RETRY_FIRST = 0.05  # first wait after a failed publish; doubles up to RETRY_MAX
RETRY_MAX = 1.0
# While the cluster answers "no responders" (a stream between leaders) the answer is immediate
# and cheap: retry at this pace for NO_LEADER_FAST_FOR seconds, so publishing resumes within a
# tenth of a second of the election, then fall back to the doubling wait.
NO_LEADER_RETRY = 0.1
NO_LEADER_FAST_FOR = 30.0
# Tests set this to make the process die right after JetStream acknowledged a batch and before it
# is marked published: the crash that a re-send after the duplicate window must survive.
CRASH_AFTER_ACK = os.environ.get("HARMONYLITE_TEST_CRASH_AFTER_ACK") == "1"
CRASH_EXIT_CODE = 86
CHECKPOINT_EVERY = 0.01  # seconds between background WAL checkpoints while the database changes


@dataclass
class Outgoing:
    msg_id: str
    subject: str
    payload: bytes
    count: int
    first: tuple[str, tuple[object, ...]]  # table and key of its first change, for reports
    acked: bool = False
    # Set once the payload is stored out of band: the small message published in its place.
    reference: bytes | None = None


@dataclass
class InFlight:
    upto: int
    entries: int  # change-log entries it covers (several changes to a row collapse into one)
    messages: list[Outgoing] = field(default_factory=list)


@dataclass
class Pending:
    """Change-log entries up to ``upto``, as the changes to send and their tables' shapes."""

    upto: int
    changes: list[Change]
    shapes: dict[str, TableShape]
    entries: int = 0
    epoch: str = ""  # the epoch it goes out under (a re-sent batch keeps its first one)


class ChangeWatcher:
    """Wakes the publisher when the database changes: polls ``PRAGMA data_version``.

    The pragma reads a counter in shared memory, so a poll costs microseconds and no I/O; polling
    every few milliseconds keeps detection prompt without spinning a core.

    It also checkpoints the WAL after changes (PASSIVE: it never waits for, or blocks, a reader or
    a writer). The change log doubles the WAL frames each application commit writes, and with them
    the checkpoints SQLite would otherwise run inside the application's commits once the WAL
    passes 1,000 frames; done here, on the node's own thread, that cost leaves the application.
    """

    def __init__(self, db_path: str, interval: float, wake: Callable[[], None],
                 checkpoint_every: float = CHECKPOINT_EVERY,
                 on_schema: Callable[[], None] | None = None) -> None:
        self._db_path = db_path
        self._interval = interval
        self._wake = wake
        self._checkpoint_every = checkpoint_every
        self._on_schema = on_schema
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-watcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        conn = open_connection(self._db_path)
        try:
            last = conn.execute("PRAGMA data_version").fetchone()[0]
            schema = conn.execute("PRAGMA schema_version").fetchone()[0]
            dirty, checkpointed = False, time.monotonic()
            failing: str | None = None
            while not self._stop.wait(self._interval):
                try:
                    now = conn.execute("PRAGMA data_version").fetchone()[0]
                    if now != last:
                        last, dirty = now, True
                        self._wake()
                        # A DDL commit moves data_version too: only then is the schema read.
                        version = conn.execute("PRAGMA schema_version").fetchone()[0]
                        if version != schema:
                            schema = version
                            if self._on_schema is not None:
                                self._on_schema()
                    if dirty and time.monotonic() - checkpointed >= self._checkpoint_every:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                        dirty, checkpointed = False, time.monotonic()
                    if failing is not None:
                        log.info("change watcher reads the database again")
                        failing = None
                except sqlite3.Error as exc:
                    # Polled every few ms: say it once per state change, not on every poll.
                    if str(exc) != failing:
                        log.warning("change watcher cannot read the database (retrying): %s",
                                    exc)
                    failing = str(exc)
        finally:
            conn.close()


class Publisher:
    def __init__(self, cfg: Config, db: DbThread, js: JetStreamContext,
                 epoch: str | None = None, *, metrics: Metrics | None = None,
                 held: Callable[[], set[str]] | None = None) -> None:
        # The publisher's own connection: reading and marking never wait behind the applier.
        self.cfg = cfg
        self.db = db
        self.metrics = metrics
        self.js = js
        self.epoch = epoch or secrets.token_hex(4)
        self.wake = asyncio.Event()
        self.published_total = 0
        self.last_published_at: float | None = None
        self.pending = 0
        self.last_error: str | None = None
        # Unix time of the first failed attempt while changes wait to go out (None: none wait).
        self.unpublished_since: float | None = None
        self._registry: dict[int, TableShape] = {}
        self._rows = RowReader()
        self._inflight: InFlight | None = None
        self._large: LargeChangeStore | None = None
        # Tables whose republished rows must wait (changes of other nodes parked for them are
        # about to be applied here; see ``Applier.held_tables``).
        self._held = held

    def _build(self, batch: Pending) -> InFlight:
        by_name, changes = batch.shapes, batch.changes
        shards = self.cfg.replication_log.shards
        groups: dict[int, list[Change]] = {}
        for ch in changes:
            shape = by_name[ch.table]
            # A table with a secondary UNIQUE constraint needs one order for all its rows (a
            # value moving between rows): the whole table goes to one shard.
            # A key is hashed as its collation compares it ('Key' and 'KEY' under NOCASE are
            # one row, so one stream).
            key = [] if shape.single_order else list(fold_key(
                [ch.values[i] for i in shape.pk_indexes], shape.key_collations))
            groups.setdefault(shard_of(ch.table, key, shards), []).append(ch)
        flight = InFlight(upto=batch.upto, entries=batch.entries)
        compress = self.cfg.replication_log.compress
        limit = server_limit(self.js)
        epoch = batch.epoch or self.epoch

        def size_of(part: list[Change]) -> int:
            return len(encode(self.cfg.node_id, part, by_name, compress, epoch))

        for shard, group in sorted(groups.items()):
            for part in split_by_size(group, size_of, limit):
                msg_id = f"{self.cfg.node_id}:{epoch}:{part[0].id}-{part[-1].id}:{shard}"
                payload = encode(self.cfg.node_id, part, by_name, compress, epoch)
                subject = self.cfg.names.subject(shard)
                shape = by_name[part[0].table]
                first = (part[0].table, tuple(part[0].values[i] for i in shape.pk_indexes))
                flight.messages.append(Outgoing(msg_id, subject, payload, len(part), first))
        return flight

    async def _out_of_band(self, m: Outgoing, limit: int) -> bytes:
        """Store an oversized message's payload in the object store; return its reference."""
        if self._large is None:
            self._large = LargeChangeStore(self.js, self.cfg.names.large_changes_bucket,
                                           self.cfg.replication_log.replicas, self.cfg.node_id)
        table, key = m.first
        try:
            ref = await self._large.put(m.payload, table, key)
        except Exception as exc:
            raise StorageUnavailable(
                f"{describe(m.count, table, key, len(m.payload), limit)} and cannot be stored "
                f"in object store bucket {self._large.bucket}: {exc}; they stay pending and are "
                f"retried") from exc
        log.info("%s: stored as object %s in bucket %s", describe(m.count, table, key,
                 len(m.payload), limit), ref.name, ref.bucket,
                 extra={"table": table, "size": len(m.payload)})
        return ref.encode()

    async def _send(self, flight: InFlight) -> None:
        """Send the unacknowledged messages; within a shard, one after the other.

        Receivers ignore a change whose origin already had a later change applied from that
        stream (DESIGN rule 15), so a shard's messages must be stored in change order: a later
        part is sent only once the earlier one is acknowledged. Shards go out together, and a
        batch usually has one message per shard, so this costs a round trip only for batches
        cut into several messages.
        """
        by_subject: dict[str, list[Outgoing]] = {}
        for m in flight.messages:
            if not m.acked:
                by_subject.setdefault(m.subject, []).append(m)
        rounds = [[q[i] for q in by_subject.values() if i < len(q)]
                  for i in range(max(map(len, by_subject.values()), default=0))]
        for todo in rounds:
            await self._send_round(todo)

    async def _send_round(self, todo: list[Outgoing]) -> None:
        futures: list[asyncio.Future[Any]] = []
        # Checked at send time, not only when cutting: after a reconnect the server may be one
        # with a lower limit than the batch was cut for.
        limit = server_limit(self.js)
        try:
            for m in todo:
                headers = {"Nats-Msg-Id": m.msg_id}
                if m.reference is None and len(m.payload) > limit:
                    m.reference = await self._out_of_band(m, limit)
                if m.reference is not None:
                    headers[REF_HEADER] = "1"
                body = m.payload if m.reference is None else m.reference
                futures.append(await self.js.publish_async(
                    m.subject, body, headers=headers, wait_stall=ACK_TIMEOUT))
            errors: list[BaseException] = []
            for m, fut in zip(todo, futures, strict=False):
                try:
                    # publish_async futures may never resolve on some server errors: bound it.
                    await asyncio.wait_for(fut, ACK_TIMEOUT)
                    m.acked = True
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    def _read(self, conn: sqlite3.Connection, after: int, limit: int,
              upto: int | None = None, held: set[str] | None = None) -> Pending:
        entries = changelog.read_entries(conn, after, limit, self._registry, upto)
        if held:
            # A republished row (rebuilt or new table) read now would lack the changes parked
            # for its table, and would overwrite them everywhere: stop before it (log order is
            # kept) until they are applied; the rows are read then.
            for i, e in enumerate(entries):
                if e.op == ddl.OP_BACKFILL and self._registry[e.tid].name in held:
                    entries = entries[:i]
                    break
        if not entries:
            return Pending(0, [], {})
        changes, shapes = self._rows.changes(conn, entries, self._registry)
        return Pending(entries[-1].id, changes, shapes, len(entries))

    def _read_consistent(self, conn: sqlite3.Connection, after: int, limit: int,
                         upto: int | None = None) -> Pending:
        """Read entries and their rows in one read transaction (one view of the database),
        without the write lock: the application keeps committing meanwhile."""
        # Asked before the read transaction starts: a hold ends only once the changes it waits
        # for are committed, so a read that starts after it ends sees them.
        held = self._held() if self._held is not None else None
        conn.execute("BEGIN")
        try:
            return self._read(conn, after, limit, upto, held)
        finally:
            conn.execute("COMMIT")

    def _next_batch(self, conn: sqlite3.Connection) -> Pending:
        """The next changes to send, recorded as the publisher's intent before they go out.

        Rows are read before the intent is recorded. Until it is, the applier treats every
        entry of the batch as a local change not yet sent and leaves those rows alone, so the
        state read is the state sent; a write after the read has its own, later entry."""
        if not self._registry:
            self._registry.update(changelog.registry(conn))
        wm, upto = changelog.watermark(conn), changelog.intent(conn)
        if upto > wm:
            # A batch was being published when the process stopped: send the same changes
            # again, cut the same way and under the epoch they first went out under (every
            # start takes a new one, see ``node.origin``), so their message ids match and
            # JetStream drops any copy it already stored (receivers ignore one it does not).
            batch = self._read_consistent(conn, wm, 2**62, upto)
            batch.epoch = changelog.intent_epoch(conn) or self.epoch
            return batch
        batch = self._read_consistent(conn, wm, self.cfg.scan_max_changes)
        if batch.upto:
            with write_transaction(conn):
                changelog.set_intent(conn, batch.upto, self.epoch)
        return batch

    def _mark_then_next(self, conn: sqlite3.Connection, upto: int) -> Pending:
        """Mark a batch published and take the next one with a single short write transaction:
        under a steady stream of commits the node takes the write lock once per batch, and only
        for two one-row updates (the reading happens before, without the lock)."""
        batch = self._read_consistent(conn, upto, self.cfg.scan_max_changes)
        with write_transaction(conn):
            changelog.mark_published(conn, upto)
            if batch.upto:
                changelog.set_intent(conn, batch.upto, self.epoch)
        return batch

    async def flush_once(self) -> int:
        """Publish one batch; returns the number of changes published (0 when none pending)."""
        if self._inflight is None:
            batch = await self.db.call(self._next_batch)
            if not batch.upto:
                if self.pending and self.metrics is not None:
                    self.metrics.set_pending(0)
                self.pending = 0
                return 0
            self._inflight = self._build(batch)
        flight = self._inflight
        await self._send(flight)
        if CRASH_AFTER_ACK:  # test seam: die between the acknowledgement and the mark
            os._exit(CRASH_EXIT_CODE)
        following = await self.db.call(lambda conn: self._mark_then_next(conn, flight.upto))
        self._inflight = self._build(following) if following.upto else None
        count = sum(m.count for m in flight.messages)
        self.published_total += count
        if self.metrics is not None:
            self.metrics.published(count)
        self.last_published_at = time.time()
        self.last_error = None
        return flight.entries

    async def flush(self) -> int:
        total = 0
        while True:
            n = await self.flush_once()
            total += n
            if n == 0:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        """Publish whenever woken, until ``stop``; back off while NATS is unreachable.

        The retry wait starts short and caps at ``RETRY_MAX``: after a stream leader change the
        cluster is back within seconds, and a long doubling wait (it used to reach 5 s) added
        more stall than the election itself. Failures are logged once per outage, not per try.
        """
        backoff = RETRY_FIRST
        failing_since: float | None = None
        while not stop.is_set():
            self.wake.clear()
            try:
                await self.flush()
                backoff = RETRY_FIRST
                self.unpublished_since = None
                if failing_since is not None:
                    log.info("publishing resumed after %.1f s", time.monotonic() - failing_since)
                    failing_since = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                self.pending = await self.db.call(changelog.pending_count)
                if self.metrics is not None:
                    self.metrics.set_pending(self.pending)
                if self.pending and self.unpublished_since is None:
                    self.unpublished_since = time.time()
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("publish failed, %d changes stay pending (retrying until it "
                                "works): %s", self.pending, self.last_error)
                else:
                    log.debug("publish still failing, %d changes pending: %s", self.pending,
                              self.last_error)
                no_leader = isinstance(exc, NoStreamResponseError | ServiceUnavailableError
                                       | NoRespondersError)
                if no_leader and time.monotonic() - failing_since < NO_LEADER_FAST_FOR:
                    await wait_any(stop, timeout=NO_LEADER_RETRY)
                    continue
                await wait_any(stop, timeout=backoff)
                backoff = min(backoff * 2, RETRY_MAX)
                continue
            await wait_any(stop, self.wake)

