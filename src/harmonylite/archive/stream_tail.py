"""Reading one stream from a sequence on, for the archive: an ordered push consumer whose
callback only queues (bounded, so a slow store slows the server's delivery, not memory).

A large change stored out of band is resolved before it is queued: the archive keeps the
payload itself, since the large-change bucket does not live as long as the archive.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy

from harmonylite.archive.segment import Message, datetime_to_us
from harmonylite.replication import large_changes
from harmonylite.replication.spool import as_bytes

log = logging.getLogger(__name__)

MAX_QUEUED = 4096


class StreamTail:
    def __init__(self, js: JetStreamContext, stream: str, subject: str, spool: Path | None) -> None:
        self.js = js
        self.stream = stream
        self.subject = subject
        self.spool = spool
        self.queue: asyncio.Queue[Message] = asyncio.Queue(MAX_QUEUED)
        self.head = 0  # the newest sequence the stream is known to hold
        self._sub: Subscription | None = None
        self._upto = 0

    async def start(self, first: int) -> None:
        """Deliver from sequence ``first`` on."""
        await self.stop()
        self._upto = first - 1
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                             opt_start_seq=max(1, first))
        self._sub = await self.js.subscribe(
            self.subject, stream=self.stream, cb=self._on_msg, ordered_consumer=True,
            config=cfg, idle_heartbeat=2.0, pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def _on_msg(self, msg: Msg) -> None:
        meta = msg.metadata
        seq = int(meta.sequence.stream)
        if seq <= self._upto:
            return  # delivered again after the ordered consumer re-created itself
        headers = dict(msg.headers or {})
        data = await large_changes.resolve(self.js, msg.data, headers, self.spool)
        headers.pop(large_changes.REF_HEADER, None)
        self.head = max(self.head, seq + int(meta.num_pending))
        self._upto = seq
        await self.queue.put(Message(seq, datetime_to_us(meta.timestamp), headers,
                                     as_bytes(data)))

    async def stop(self) -> None:
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be gone already
                log.debug("unsubscribe from %s: %s", self.stream, exc)
