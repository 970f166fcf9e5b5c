"""One consumer per shard: receive in stream order, apply in batches, remember the position.

An ordered push consumer with a callback is the fastest way nats-py delivers (it only queues the
message here); the applying task drains the queue in groups and applies each group in one
transaction on the writer thread. The position is the stream sequence recorded with the data, so a
restart resumes at exactly the next message.

A group never ends inside an origin's publish batch (:mod:`harmonylite.replication.groups`).

A group in hand is never dropped: a transient error (database locked, disk full…) stalls the
consumer, which says so once, retries with a capped backoff and resumes by itself; the group
survives a restart of the task by the supervisor. Stream sequences must be contiguous: a jump
means the stream dropped messages this node never applied (a gap), which is reported at once
(DESIGN rule 16).

A consumer always comes back (:meth:`ShardConsumer.keep`). On a JetStream cluster the server-side
consumer lives on one server: it goes away with that server, with a stream leader change or when
a re-subscribe after a reconnect times out. The keeper re-creates it from the last sequence
queued or applied, retrying quickly at first (a cluster that just lost a server elects new leaders
within seconds) and then every ``RESUB_MAX`` seconds, forever. It also watches the stream: a
consumer that receives nothing for ``SILENT_AFTER`` seconds while the stream holds messages it has
not queued is presumed dead and re-created. Each change of state is logged once, and
``not_consuming`` names the reason for health meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from harmonylite.aio import Backoff, Patience, wait_any
from harmonylite.bus.streams import describe_error, offline_for_all
from harmonylite.db.connection import DbThread
from harmonylite.errors import NatsError
from harmonylite.replication import large_changes
from harmonylite.replication.apply import Applier
from harmonylite.replication.cut_hold import Hold, wait_at_cut
from harmonylite.replication.event import MORE_HEADER, ORIGIN_HEADER
from harmonylite.replication.groups import Queued, gather
from harmonylite.replication.outcome import ApplyResult, is_transient

log = logging.getLogger(__name__)

MAX_QUEUED = 8192
STALL_BACKOFF_FIRST = 0.05
STALL_BACKOFF_MAX = 5.0
RESUB_FIRST = 0.2  # first retry of a lost consumer; doubles up to RESUB_MAX
RESUB_MAX = 2.0  # bounded low: a consumer resumes within about the election time plus this
CHECK_EVERY = 1.0  # seconds between looks at the stream's head
SILENT_AFTER = 4.0  # nothing received this long while the stream is ahead: consumer presumed dead
SUBSCRIBE_TIMEOUT = 2.0  # a stream without a leader never answers: do not wait long
INFO_TIMEOUT = 2.0
UNREADABLE_AFTER = 3.0  # a stream that does not answer this long is reported as not consumed

GapHandler = Callable[[str, int, int], None]


def near_head(max_entries: int) -> int:
    """Messages behind a stream's head that still count as in step with it: a small part of
    what a stream keeps (a snapshot taken that far behind is still well inside it)."""
    return max(16, min(500, max_entries // 4))


class ShardConsumer:
    def __init__(self, js: JetStreamContext, stream: str, subject: str, writer: DbThread,
                 applier: Applier, position: int,
                 on_applied: Callable[[str, int, ApplyResult], None],
                 on_gap: GapHandler | None = None, near_head: int = 16,
                 hold: Hold | None = None) -> None:
        self.js = js
        self.hold = hold
        self.stream = stream
        self.subject = subject
        self.writer = writer
        self.applier = applier
        self.position = position  # last applied sequence
        self._queued_upto = position
        # Bounded: while the applier is behind, the callback waits, the subscription stops
        # answering flow control and the server slows down, so memory stays flat on catch-up.
        self._queue: asyncio.Queue[Queued] = asyncio.Queue(MAX_QUEUED)
        self._sub: Subscription | None = None
        self._on_applied = on_applied
        self._on_gap = on_gap
        self._holding: list[Queued] = []  # the group being applied
        self._preloaded: deque[Queued] = deque()  # read ahead during a restore: before the queue
        self._spool = writer.path.parent  # large changes wait in files beside the database
        self.applied_messages = 0
        self.failed_messages = 0
        self.last_applied_at: float | None = None
        self.stream_last_seq = position  # newest sequence the stream is known to hold
        self.last_message_at: float | None = None  # JetStream time of the newest applied message
        self.stalled: str | None = None  # why applying cannot proceed right now
        self.stalled_since: float | None = None
        self.gaps: list[tuple[int, int]] = []  # sequences the stream dropped before we had them
        self.not_consuming: str | None = None  # why no subscription is delivering right now
        self.not_consuming_since: float | None = None
        self.resubscribes = 0
        self.head_seen_at: float | None = None  # monotonic time the stream's head was last read
        self.near_head = near_head
        # Monotonic time this node was last seen within ``near_head`` messages of the head.
        self.near_head_at: float | None = None
        self._resub = asyncio.Event()  # set to have the keeper re-create the subscription
        self._last_received = time.monotonic()
        self._in_callback = False
        self._silent = False  # the last loss was a subscription that delivered nothing
        self._unreadable_since: float | None = None  # since when the stream does not answer
        # The cluster says the stream is offline (all its servers down): no node can consume it,
        # so this node is no further behind than any other.
        self.stream_offline = False

    async def _on_msg(self, msg: Msg) -> None:
        self._last_received = time.monotonic()
        if self._silent:
            self._found()
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self._queued_upto:
            return  # delivered again after a resubscribe; already queued or applied
        self._in_callback = True  # a long fetch or a full queue is not a dead consumer
        try:
            # A large change arrives as a reference to an object: fetched here (retried until it
            # succeeds), so everything after it waits and the applier sees an ordinary payload.
            data = await large_changes.resolve(self.js, msg.data, msg.headers, self._spool)
            if seq <= self._queued_upto:
                return  # queued meanwhile by a newer subscription (a resubscribe during the fetch)
            self.stream_last_seq = max(self.stream_last_seq, seq + meta.num_pending)
            if seq > self._queued_upto + 1:
                self._gap(self._queued_upto + 1, seq - 1)
            self._queued_upto = seq
            headers = msg.headers or {}
            await self._queue.put(Queued(seq, data, meta.timestamp.timestamp(),
                                         headers.get(ORIGIN_HEADER, ""),
                                         headers.get(MORE_HEADER) == "1"))
        finally:
            self._in_callback = False
            self._last_received = time.monotonic()

    def preload(self, messages: list[Queued]) -> None:
        """Messages already read (by a read-ahead during a restore), contiguous after this
        consumer's position: applied first, as if queued, and the subscription starts after
        them."""
        if not messages or self._holding or self._preloaded \
                or messages[0].seq != self._queued_upto + 1:
            return
        self._preloaded.extend(messages)
        self._queued_upto = messages[-1].seq
        self.stream_last_seq = max(self.stream_last_seq, self._queued_upto)
        log.debug("consuming %s from sequence %d: %d messages read ahead during the restore, "
                  "then the stream", self.stream, messages[0][0], len(messages))

    async def subscribe_with_retry(self, timeout: float = 60.0) -> None:
        """Subscribe, waiting while a JetStream cluster that just (re)started elects leaders."""
        patience = Patience(timeout, 0.5)
        while True:
            try:
                await self.subscribe()
                await self._check_head()  # know where the stream stands from the start
                return
            except (NatsTimeoutError, TimeoutError, ServiceUnavailableError) as exc:
                if patience.exhausted:
                    raise NatsError(f"cannot consume {self.stream}: {exc}") from exc
                log.warning("waiting for JetStream to serve %s: %s", self.stream, exc)
                await patience.wait()

    async def subscribe(self) -> None:
        """(Re)subscribe from the last sequence queued or applied."""
        await self.unsubscribe()
        self._queued_upto = max(self._queued_upto, self.position)
        start = self._queued_upto + 1
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
        self._sub = await self.js.subscribe(
            self.subject, stream=self.stream, cb=self._on_msg, ordered_consumer=True,
            config=cfg, idle_heartbeat=2.0, pending_msgs_limit=-1, pending_bytes_limit=-1,
        )
        self._last_received = time.monotonic()
        log.debug("consuming %s from sequence %d", self.stream, start)

    async def unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe from %s: %s", self.stream, exc)

    def resubscribe(self) -> None:
        """Have the keeper re-create the subscription now (after a reconnect, say)."""
        self._resub.set()

    async def keep(self, stop: asyncio.Event) -> None:
        """Keep a subscription delivering until ``stop``: re-create it whenever it is lost."""
        backoff = Backoff(RESUB_FIRST, RESUB_MAX)
        while not stop.is_set():
            if self._sub is None or self._resub.is_set():
                self._resub.clear()
                began = time.monotonic()
                try:
                    await asyncio.wait_for(self.subscribe(), SUBSCRIBE_TIMEOUT)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Whatever failed (timeout, 503 without a leader, a closed connection), the
                    # only way forward is to try again: never give up on a stream.
                    self._sub = None
                    await self._unreadable(exc)
                    self._lost(f"cannot subscribe: {describe_error(exc)}")
                    # Attempts start every ``backoff`` seconds: one that timed out has already
                    # waited, so the next follows at once once the cluster can answer.
                    await backoff.wait(stop, spent=time.monotonic() - began)
                    continue
                backoff.reset()
                self.stream_offline = False  # it answered
                self.resubscribes += 1
                if not self._silent:
                    self._found()  # a silent consumer is back only once something arrives
            await wait_any(stop, self._resub, timeout=CHECK_EVERY)
            if not stop.is_set() and not self._resub.is_set():
                await self._check_head()

    async def _check_head(self) -> None:
        """Read the stream's head; re-create a consumer that is silent while the stream is ahead."""
        try:
            info = await asyncio.wait_for(self.js.stream_info(self.stream), INFO_TIMEOUT)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # No leader, no quorum: nothing can be consumed from the stream meanwhile. Said in
            # health once it lasts, and head_seen_at ages for the snapshot leader's check.
            await self._unreadable(exc)
            now = time.monotonic()
            self._unreadable_since = self._unreadable_since or now
            if now - self._unreadable_since >= UNREADABLE_AFTER:
                self._lost(f"the stream does not answer ({describe_error(exc)})")
            return
        self._unreadable_since = None
        self.stream_offline = False
        now = time.monotonic()
        head = int(info.state.last_seq)
        self.head_seen_at = now
        self.stream_last_seq = max(self.stream_last_seq, head)
        self._note_lag(now)
        silent = now - self._last_received
        if (head > self._queued_upto and self._queue.empty() and not self._in_callback
                and silent >= SILENT_AFTER):
            self._lost(f"received nothing for {silent:.0f} s while the stream is at {head} and "
                       f"this node at {self._queued_upto}")
            self._silent = True
            self._resub.set()
        elif self.not_consuming is not None and self._sub is not None and (
                not self._silent or head <= self._queued_upto):
            self._found()  # the stream answers again and nothing is missing from our feed

    async def _unreadable(self, exc: BaseException) -> None:
        # Once the cluster has said the stream is offline, only a successful read says otherwise:
        # the requests that follow (a consumer's create, the next stream info) may time out
        # rather than answer "offline" again, and the stream is no more readable for that.
        if not self.stream_offline:
            self.stream_offline = await offline_for_all(self.js, self.stream, exc)

    def _lost(self, reason: str) -> None:
        if self.not_consuming is None:
            self.not_consuming_since = time.monotonic()
            log.warning("not consuming %s: %s; re-creating the consumer from sequence %d until "
                        "it works", self.stream, reason, self._queued_upto + 1,
                        extra={"stream": self.stream, "sequence": self._queued_upto + 1})
        else:
            log.debug("still not consuming %s: %s", self.stream, reason)
        self.not_consuming = reason

    def _found(self) -> None:
        self._silent = False
        if self.not_consuming is None:
            return
        took = time.monotonic() - (self.not_consuming_since or time.monotonic())
        log.info("consuming %s again from sequence %d after %.1f s", self.stream,
                 self._queued_upto + 1, took, extra={"stream": self.stream})
        self.not_consuming = self.not_consuming_since = None

    def _gap(self, first: int, last: int) -> None:
        self.gaps.append((first, last))
        log.error("gap in stream %s: messages %d..%d were dropped by the stream before this node "
                  "applied them", self.stream, first, last,
                  extra={"stream": self.stream, "from_seq": first, "to_seq": last})
        if self._on_gap is not None:
            self._on_gap(self.stream, first, last)

    def _note_lag(self, now: float) -> None:
        if self.lag <= self.near_head:
            self.near_head_at = now

    @property
    def lag(self) -> int:
        return max(self.stream_last_seq - self.position, 0)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply queued messages in groups until ``stop``; a group in progress is finished."""
        if self._holding:  # restarted by the supervisor with a group still in hand
            await self._apply(self._holding, stop)
        while not stop.is_set():
            if self._preloaded:
                first = self._preloaded.popleft()
            else:
                get = asyncio.create_task(self._queue.get())
                halt = asyncio.create_task(stop.wait())
                done, _ = await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
                halt.cancel()
                if get not in done:
                    get.cancel()
                    return
                first = get.result()
            group = await self._gather(first, stop)
            if group is None:
                return
            await self._apply(group, stop)

    async def _gather(self, first: Queued, stop: asyncio.Event) -> list[Queued] | None:
        """A group from ``first`` on (see :mod:`harmonylite.replication.groups`), held until it
        is applied."""
        group: list[Queued] = []
        self._holding = group
        return await gather(group, first, self._preloaded, self._queue, stop, self.stream)

    async def _apply(self, group: list[Queued], stop: asyncio.Event) -> None:
        group = [m for m in group if m.seq > self.position]
        if self.hold is not None and group and group[-1].seq > self.hold.after:
            # Messages past the hold wait until the others are caught up (shard count changed).
            before = [m for m in group if m.seq <= self.hold.after]
            if before:
                await self._apply_now(before, stop)
                if stop.is_set():
                    return  # what is not applied stays held
            self._holding = group = group[len(before):]
            if not await self._wait_hold(stop):
                return  # the group stays held
        await self._apply_now(group, stop)

    async def _wait_hold(self, stop: asyncio.Event) -> bool:
        assert self.hold is not None
        if not await wait_at_cut(self.hold, self.stream, stop, self._stall_at_cut):
            return False
        self.hold = None
        return True

    def _stall_at_cut(self, why: str | None, since: float | None) -> None:
        self.stalled = why
        self.stalled_since = None if why is None else self.stalled_since or since

    async def _apply_now(self, group: list[Queued], stop: asyncio.Event) -> None:
        if not group:
            self._holding = []
            return
        stream = self.stream
        msgs = [(m.seq, m.data) for m in group]
        backoff = Backoff(STALL_BACKOFF_FIRST, STALL_BACKOFF_MAX)
        while True:
            try:
                result = await self.writer.call(
                    lambda conn: self.applier.apply(conn, stream, msgs))
                break
            except Exception as exc:
                if not is_transient(exc):
                    raise  # a bug: the supervisor logs it and restarts us, group still held
                reason = f"{type(exc).__name__}: {exc}"
                if self.stalled != reason:
                    log.warning("apply stalled on %s at sequence %d: %s; retrying until it "
                                "works", stream, msgs[0][0], reason,
                                extra={"stream": stream, "sequence": msgs[0][0]})
                    self.stalled_since = self.stalled_since or time.monotonic()
                self.stalled = reason
                await backoff.wait(stop)
                if stop.is_set():
                    return  # shutting down; the group is applied again on the next start
        if self.stalled is not None:
            log.info("apply resumed on %s after %.1f s", stream,
                     time.monotonic() - (self.stalled_since or time.monotonic()),
                     extra={"stream": stream})
            self.stalled = self.stalled_since = None
        self._holding = []
        result.published_at = group[-1].at
        self.last_message_at = group[-1].at
        self.position = max(self.position, result.last_seq)
        self._note_lag(time.monotonic())
        self.applied_messages += result.messages - len(result.failed)
        self.failed_messages += len(result.failed)
        self.last_applied_at = time.time()
        for seq, reason in result.failed:
            log.error("%s sequence %d was not applied whole: %s (see harmonylite dead-letters "
                      "list)", stream, seq, reason, extra={"stream": stream, "sequence": seq})
        self._on_applied(stream, self.position, result)
