"""Publishing pending changes: detect, read a batch, encode per shard, publish, then mark.

A batch is everything pending when it is read, so it ends at a commit (see ``batches``); it is
read, encoded and published in chunks of ``scan_max_changes`` changes. Every message carries its
origin (``Harmonylite-Origin``) and every message of a batch but the last on its shard says "more
follows" (``Harmonylite-More``), so a receiver applies what one transaction wrote in one
transaction. A shard that got a "more" message and has nothing in the batch's last chunk gets an
empty message that ends the batch there.

A chunk stays in memory until every one of its messages is acknowledged; a retry resends only the
unacknowledged ones, each with the same ``Nats-Msg-Id`` so JetStream drops a copy that was stored
after all (DESIGN rule 11). The watermark moves only after the whole batch is acknowledged.

Batches open at most once per ``pace`` (the change watcher's polling interval): each opens with
one short write transaction (the previous batch's mark and this one's intent), and an application
committing single rows faster than that would otherwise meet one node commit per commit of its
own, and wait for the write lock behind it. Under such a stream of commits a batch carries the
commits of one interval; a commit after a quiet moment goes out at once.

The last change id of the batch is recorded before it is sent. If the process dies between the
acknowledgement and the watermark, the next start re-sends that batch, cut the same way, so the
message ids repeat and JetStream's duplicate window (2 minutes) drops the copies instead of
appending old row states after newer ones.

Messages are cut under the server's ``max_payload`` (learned from the connection's INFO); a message
that still does not fit (one large change) is carried out of band, see ``large_changes``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Callable
from typing import Any

from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from harmonylite.aio import Backoff, wait_any
from harmonylite.bus.names import namespace
from harmonylite.cdc import changelog
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.errors import StorageUnavailable
from harmonylite.ops.metrics import Metrics
from harmonylite.replication.batches import BatchReader
from harmonylite.replication.event import (
    BATCH_HEADER,
    MORE_HEADER,
    ORIGIN_HEADER,
    SHARDS_HEADER,
)
from harmonylite.replication.large_changes import (
    REF_HEADER,
    LargeChangeStore,
    describe,
    server_limit,
)
from harmonylite.replication.outgoing import InFlight, Outgoing, ShardMessages
from harmonylite.replication.own_returns import OwnReturns
from harmonylite.replication.schema_send import SchemaSender
from harmonylite.replication.spool import Spooled, as_bytes
from harmonylite.replication.watcher import ChangeWatcher

__all__ = ["ChangeWatcher", "Publisher"]

log = logging.getLogger(__name__)

# An acknowledgement normally takes milliseconds, even from an R3 stream; one that has not come
# in 2 s was lost with a server or a leader (a retry is safe: the message id de-duplicates it).
ACK_TIMEOUT = 2.0
RETRY_FIRST = 0.05  # first wait after a failed publish; doubles up to RETRY_MAX
RETRY_MAX = 1.0
HOLD_LOOK = 0.5  # seconds between looks at a hold on publishing
# While the cluster answers "no responders" (a stream between leaders) the answer is immediate
# and cheap: retry at this pace for NO_LEADER_FAST_FOR seconds, so publishing resumes within a
# tenth of a second of the election, then fall back to the doubling wait.
NO_LEADER_RETRY = 0.1
NO_LEADER_FAST_FOR = 30.0
# Tests set this to make the process die right after JetStream acknowledged a batch and before it
# is marked published: the crash that a re-send after the duplicate window must survive.
CRASH_AFTER_ACK = os.environ.get("HARMONYLITE_TEST_CRASH_AFTER_ACK") == "1"
CRASH_EXIT_CODE = 86


class Publisher:
    def __init__(self, cfg: Config, db: DbThread, js: JetStreamContext,
                 epoch: str | None = None, *, metrics: Metrics | None = None,
                 held: Callable[[], set[str]] | None = None,
                 schema: SchemaSender | None = None,
                 hold: Callable[[], str | None] | None = None, pace: float = 0.0,
                 returns: OwnReturns | None = None) -> None:
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
        self.origin = f"{cfg.node_id}:{self.epoch}"
        # Tables whose republished rows must wait (changes of other nodes parked for them are
        # about to be applied here; see ``Applier.held_tables``).
        self._batches = BatchReader(cfg.scan_max_changes, held, self.epoch)
        self._inflight: InFlight | None = None
        self._messages = ShardMessages(cfg, js, self._batches)
        self._large: LargeChangeStore | None = None
        self._schema = schema  # this node's schema changes (replicate_ddl), between batches
        # Why nothing may be published now (None: it may): a node whose shared settings no
        # longer match the cluster's would publish where the others do not read.
        self._hold = hold or (lambda: None)
        self.holding: str | None = None
        self._pace = pace  # shortest time between two batches' openings, in seconds
        # Notes what went out on each stream, so the change log keeps it until it is back.
        self._returns = returns
        self._opened_at = -pace  # monotonic time the last batch was opened

    async def _paced(self) -> None:
        """Wait until ``pace`` has passed since the last batch opened (the commits meanwhile
        join the next one)."""
        due = self._opened_at + self._pace - time.monotonic()
        if due > 0:
            await asyncio.sleep(due)

    async def _out_of_band(self, m: Outgoing, limit: int) -> bytes:
        """Store an oversized message's payload in the object store; return its reference."""
        if self._large is None:
            self._large = LargeChangeStore(self.js, namespace(self.cfg).large_changes_bucket,
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
                headers = {"Nats-Msg-Id": m.msg_id, ORIGIN_HEADER: self.origin}
                if m.more:
                    headers[MORE_HEADER] = "1"
                if m.batch:
                    headers[BATCH_HEADER] = str(m.batch)
                if m.shards:
                    headers[SHARDS_HEADER] = m.shards
                if m.reference is None and (isinstance(m.payload, Spooled)
                                            or len(m.payload) > limit):
                    m.reference = await self._out_of_band(m, limit)
                if m.reference is not None:
                    headers[REF_HEADER] = "1"
                body = as_bytes(m.payload) if m.reference is None else m.reference
                futures.append(await self.js.publish_async(
                    m.subject, body, headers=headers, wait_stall=ACK_TIMEOUT))
            errors: list[BaseException] = []
            for m, fut in zip(todo, futures, strict=False):
                try:
                    # publish_async futures may never resolve on some server errors: bound it.
                    await asyncio.wait_for(fut, ACK_TIMEOUT)
                    m.acked = True
                    if self._returns is not None and m.last_id:
                        self._returns.sent(m.stream, m.last_id)
                except Exception as exc:
                    errors.append(exc)
            if errors:
                raise errors[0]
        finally:
            for fut in futures:
                if not fut.done():
                    fut.cancel()

    async def flush_once(self) -> int:
        """Publish one chunk; returns the number of changes published (0 when none pending)."""
        if self._inflight is None:
            if self._schema is not None:
                await self._schema.send()
            if not self._batches.end:
                self._messages.opened = set()  # a batch given up before its end
            await self._paced()
            opening = time.monotonic()
            chunk = await self.db.call(lambda conn: self._batches.next_chunk(self.db.aux(), conn))
            if chunk is not None:
                self._opened_at = opening
            if chunk is None:
                if self.pending and self.metrics is not None:
                    self.metrics.set_pending(0)
                self.pending = 0
                return 0
            self._inflight = self._messages.build(chunk)
            del chunk  # its rows: memory holds one chunk's encoding, not its values too
        flight = self._inflight
        try:
            await self._send(flight)
        except BaseException:
            if not flight.final:
                # Not kept open through an outage (the WAL could not be reset meanwhile): the
                # batch is read again from the watermark, cut the same way (same message ids).
                self._inflight = None
                self._messages.opened = set()
                await self.db.call(lambda _: self._batches.abandon(self.db.aux()))
            raise
        if CRASH_AFTER_ACK and flight.final:  # test seam: die between the ack and the mark
            os._exit(CRASH_EXIT_CODE)
        if flight.final:
            if self._schema is not None:  # between this batch and the next
                await self._schema.send()
            await self._paced()
            opening = time.monotonic()
            following = await self.db.call(
                lambda conn: self._batches.finish(self.db.aux(), conn))
            if following is not None:
                self._opened_at = opening
        else:
            following = await self.db.call(
                lambda conn: self._batches.next_chunk(self.db.aux(), conn))
        self._inflight = self._messages.build(following) if following is not None else None
        del following
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
            if n == 0 and self._inflight is None:  # (a chunk may collapse to no change)
                return total

    async def _held(self, stop: asyncio.Event) -> bool:
        """Whether publishing is held now (then this waited a moment): changes stay pending."""
        reason = self._hold()
        if reason != self.holding:
            if reason is not None:
                log.error("publishing held, changes stay pending in the database until it is "
                          "restarted: %s", reason)
            else:
                log.info("publishing resumes")
            self.holding = reason
        if reason is None:
            return False
        await wait_any(stop, timeout=HOLD_LOOK)  # how often a hold is looked at again
        return True

    async def run(self, stop: asyncio.Event) -> None:
        """Publish whenever woken, until ``stop``; back off while NATS is unreachable.

        The retry wait starts short and caps at ``RETRY_MAX``: after a stream leader change the
        cluster is back within seconds, and a long doubling wait (it used to reach 5 s) added
        more stall than the election itself. Failures are logged once per outage, not per try.
        """
        backoff = Backoff(RETRY_FIRST, RETRY_MAX)
        failing_since: float | None = None
        while not stop.is_set():
            self.wake.clear()
            if await self._held(stop):
                continue
            try:
                await self.flush()
                backoff.reset()
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
                await backoff.wait(stop)
                continue
            await wait_any(stop, self.wake)

