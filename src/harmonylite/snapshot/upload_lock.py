"""The snapshot upload lock.

Upload lock (key ``snapshot``): taken with ``kv.create`` around every snapshot capture and upload,
by the leader and by a manual ``snapshot save``, renewed while the upload runs, deleted after. A
holder that dies leaves it to expire with the bucket TTL. When it is held the caller gets
:class:`SnapshotBusy` (``system busy capturing snapshot``, exit 75 on the command line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator

from nats.js import JetStreamContext
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from harmonylite.bus.kv import (
    bounded,
    describe,
    heartbeat_seconds,
    lease_value,
    op_timeout_seconds,
    open_bucket,
    parse_value,
)
from harmonylite.bus.names import LOCK_KEY
from harmonylite.errors import LeaseLost, SnapshotBusy

log = logging.getLogger(__name__)


class UploadLock:
    """The short upload lock (key ``snapshot``): one capture and upload at a time, cluster-wide."""

    def __init__(self, kv: KeyValue, node_id: int, *, heartbeat: float, op_timeout: float,
                 purpose: str = "snapshot") -> None:
        self.kv = kv
        self.node_id = node_id
        self.heartbeat = heartbeat
        self.op_timeout = op_timeout
        self.purpose = purpose
        self.token = secrets.token_hex(8)
        self.revision: int | None = None
        self.lost: str | None = None
        self._ops = asyncio.Lock()
        self._renewer: asyncio.Task[None] | None = None

    async def acquire(self) -> None:
        """Take the lock or raise SnapshotBusy naming its holder."""
        value = lease_value(self.node_id, self.token, purpose=self.purpose)
        try:
            self.revision = await bounded(self.kv.create(LOCK_KEY, value), self.op_timeout)
        except KeyWrongLastSequenceError:
            holder: object = "another process"
            with contextlib.suppress(Exception):
                entry = await bounded(self.kv.get(LOCK_KEY), self.op_timeout)
                held = parse_value(entry.value)
                holder = f"node {held.get('node_id')} ({held.get('purpose', 'snapshot')})"
            raise SnapshotBusy(f"upload lock held by {holder}") from None
        self.lost = None
        self._renewer = asyncio.create_task(self._renew_loop())

    async def _renew_once(self) -> None:
        async with self._ops:
            if self.lost is not None or self.revision is None:
                return
            try:
                self.revision = await bounded(
                    self.kv.update(LOCK_KEY, lease_value(self.node_id, self.token,
                                                         purpose=self.purpose),
                                   last=self.revision),
                    self.op_timeout)
            except Exception as exc:
                self.lost = describe(exc)
                log.warning("snapshot upload lock lost: %s", self.lost,
                            extra={"node_id": self.node_id})

    async def _renew_loop(self) -> None:
        while self.lost is None:
            await asyncio.sleep(self.heartbeat)  # the renewal period, not synchronisation
            await self._renew_once()

    async def confirm(self) -> None:
        """Fence: renew at our revision now; LeaseLost when the lock is no longer ours."""
        await self._renew_once()
        if self.lost is not None:
            raise LeaseLost(f"snapshot upload lock lost: {self.lost}")

    async def release(self) -> None:
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(BaseException):
                await self._renewer
            self._renewer = None
        async with self._ops:
            if self.revision is None or self.lost is not None:
                self.revision = None
                return
            try:
                await bounded(self.kv.delete(LOCK_KEY, last=self.revision), self.op_timeout)
            except Exception as exc:
                log.warning("could not delete the snapshot upload lock (it expires by itself): "
                            "%s", describe(exc))
            self.revision = None


@contextlib.asynccontextmanager
async def upload_lock(js: JetStreamContext, node_id: int, ttl_ms: int, *, bucket: str,
                      purpose: str = "manual save",
                      replicas: int = 1, update_existing: bool = False
                      ) -> AsyncIterator[UploadLock]:
    """Hold the upload lock for the block (SnapshotBusy when held); for ``snapshot save``."""
    heartbeat = heartbeat_seconds(ttl_ms)
    timeout = op_timeout_seconds(heartbeat)
    kv = await open_bucket(js, bucket, ttl_ms, max(timeout, 2.0), replicas=replicas,
                           update_existing=update_existing)
    lock = UploadLock(kv, node_id, heartbeat=heartbeat, op_timeout=max(timeout, 2.0),
                      purpose=purpose)
    await lock.acquire()
    try:
        yield lock
    finally:
        await lock.release()
