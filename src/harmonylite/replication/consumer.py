"""One consumer per shard: receive in stream order, apply in batches, remember the position.

An ordered push consumer with a callback is the fastest way nats-py delivers (it only queues the
message here); the applying task drains the queue in groups and applies each group in one
transaction on the writer thread. The position is the stream sequence recorded with the data, so a
restart resumes at exactly the next message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from harmonylite.db.connection import DbThread
from harmonylite.errors import NatsError
from harmonylite.replication import large_changes
from harmonylite.replication.apply import Applier, ApplyResult

log = logging.getLogger(__name__)

MAX_GROUP = 2000
MAX_QUEUED = 8192


class ShardConsumer:
    def __init__(self, js: JetStreamContext, stream: str, subject: str, writer: DbThread,
                 applier: Applier, position: int,
                 on_applied: Callable[[str, int, ApplyResult], None]) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.writer = writer
        self.applier = applier
        self.position = position  # last applied sequence
        self._queued_upto = position
        # Bounded: while the applier is behind, the callback waits, the subscription stops
        # answering flow control and the server slows down, so memory stays flat on catch-up.
        self._queue: asyncio.Queue[tuple[int, bytes, float]] = asyncio.Queue(MAX_QUEUED)
        self._sub: object | None = None
        self._on_applied = on_applied
        self.applied_messages = 0
        self.failed_messages = 0
        self.last_applied_at: float | None = None

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq <= self._queued_upto:
            return  # delivered again after a resubscribe; already queued or applied
        # A large change arrives as a reference to an object: fetched here (retried until it
        # succeeds), so everything after it waits and the applier sees an ordinary payload.
        data = await large_changes.resolve(self.js, msg.data, msg.headers)
        if seq <= self._queued_upto:
            return  # queued meanwhile by a newer subscription (a resubscribe during the fetch)
        self._queued_upto = seq
        await self._queue.put((seq, data, meta.timestamp.timestamp()))

    async def subscribe_with_retry(self, timeout: float = 60.0) -> None:
        """Subscribe, waiting while a JetStream cluster that just (re)started elects leaders."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                await self.subscribe()
                return
            except (NatsTimeoutError, TimeoutError, ServiceUnavailableError) as exc:
                if loop.time() > deadline:
                    raise NatsError(f"cannot consume {self.stream}: {exc}") from exc
                log.warning("waiting for JetStream to serve %s: %s", self.stream, exc)
                await asyncio.sleep(0.5)

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
        log.debug("consuming %s from sequence %d", self.stream, start)

    async def unsubscribe(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()  # type: ignore[attr-defined]
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe from %s: %s", self.stream, exc)

    async def run(self, stop: asyncio.Event) -> None:
        """Apply queued messages in groups until ``stop``; a group in progress is finished."""
        while not stop.is_set():
            get = asyncio.create_task(self._queue.get())
            halt = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait({get, halt}, return_when=asyncio.FIRST_COMPLETED)
            halt.cancel()
            if get not in done:
                get.cancel()
                return
            group = [get.result()]
            while len(group) < MAX_GROUP and not self._queue.empty():
                group.append(self._queue.get_nowait())
            await self._apply(group)

    async def _apply(self, group: list[tuple[int, bytes, float]]) -> None:
        group = [m for m in group if m[0] > self.position]
        if not group:
            return
        stream = self.stream
        msgs = [(seq, data) for seq, data, _ in group]
        result = await self.writer.call(lambda conn: self.applier.apply(conn, stream, msgs))
        result.published_at = group[-1][2]
        self.position = max(self.position, result.last_seq)
        self.applied_messages += result.messages - len(result.failed)
        self.failed_messages += len(result.failed)
        self.last_applied_at = time.time()
        for seq, reason in result.failed:
            log.error("message skipped: cannot apply %s sequence %d: %s", stream, seq, reason,
                      extra={"stream": stream, "sequence": seq})
        self._on_applied(stream, self.position, result)
