"""The snapshot lease: a compare-and-swap key in the cluster's lease bucket (``e-harmonylite`` by
default, see :mod:`harmonylite.bus.names`).

Lease (key ``snapshot-leader``): acquired with ``kv.create``, renewed every heartbeat (TTL / 3, at
least 1 s) with ``kv.update(last=revision)``, deleted at its revision on a graceful stop. The
lease's TTL is the bucket's ``max_age`` (``snapshot.leader_ttl``): a per-key TTL does not survive
``update()``, and limit markers are never set on the bucket. Any KV error, a timeout (every call is
bounded well under a heartbeat) or a moved revision means "not leader" at once. Wall clocks of
different machines are never compared: the ``since`` in the value is informational only.

Each acquisition starts a new *term*. A snapshot remembers the term it started under, and its
fence (:meth:`LeaderElection.confirm`) renews the lease at the current revision right before the
manifest commit, raising :class:`LeaseLost` when the lease moved or the term changed.

The upload lock (key ``snapshot``) is in :mod:`harmonylite.snapshot.upload_lock`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Callable

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from harmonylite.aio import wait_any
from harmonylite.bus.kv import (
    KV_OP_HEADER,
    backoff_seconds,
    bounded,
    bucket_ttl,
    describe,
    heartbeat_seconds,
    lease_value,
    op_timeout_seconds,
    open_bucket,
    parse_value,
)
from harmonylite.bus.names import LEASE_KEY, kv_subject
from harmonylite.errors import LeaseLost

log = logging.getLogger(__name__)

ELIGIBILITY_RECHECK_SECONDS = 1.0


class LeaderElection:
    """Keeps (or keeps trying to get) the snapshot lease; ``is_leader`` is the current answer.

    ``on_change(is_leader)`` is called on each change. ``run(stop)`` is the heartbeat loop;
    ``wake()`` makes it try at once (after a reconnect, or when the key was deleted).
    """

    def __init__(
        self,
        js: JetStreamContext,
        node_id: int,
        ttl_ms: int,
        *,
        bucket: str,
        nc: Client | None = None,
        is_connected: Callable[[], bool] | None = None,
        on_change: Callable[[bool], None] | None = None,
        heartbeat: float | None = None,
        op_timeout: float | None = None,
        replicas: int = 1,
        update_existing: bool = False,
        eligible: Callable[[], str | None] | None = None,
    ) -> None:
        self.js = js
        self.bucket = bucket
        self.nc = nc
        self.node_id = node_id
        self.ttl_ms = ttl_ms
        self.heartbeat = heartbeat if heartbeat is not None else heartbeat_seconds(ttl_ms)
        self.op_timeout = op_timeout if op_timeout is not None else op_timeout_seconds(
            self.heartbeat)
        self.token = secrets.token_hex(8)
        self.is_leader = False
        self.term = 0
        self.revision: int | None = None
        self.holder: int | None = None  # node id in the lease when someone else holds it
        self._is_connected = is_connected or (lambda: True)
        self._on_change = on_change
        self._kv: KeyValue | None = None
        self._sub: Subscription | None = None
        self._ops = asyncio.Lock()
        self._wake = asyncio.Event()
        self._leader_event = asyncio.Event()
        self._failures = 0
        self._bucket_error: str | None = None  # the lease bucket's last error (None: it answers)
        self.replicas = replicas
        self.update_existing = update_existing
        # Why this node must not hold the lease now (None: it may): a node that is not applying,
        # or is far behind the streams, would snapshot a frozen database.
        self._eligible = eligible or (lambda: None)
        self.ineligible: str | None = None

    # --- state ------------------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    def _became(self, revision: int, how: str) -> None:
        self.revision = revision
        self.holder = self.node_id
        if self.is_leader:
            return
        self.is_leader = True
        self.term += 1
        self._leader_event.set()
        log.info("Became snapshot leader (%s)", how,
                 extra={"node_id": self.node_id, "revision": revision, "term": self.term})
        if self._on_change is not None:
            self._on_change(True)

    def step_down(self, reason: str) -> None:
        """Not leader any more, at once; logs ``Lost snapshot leadership`` if we were."""
        self.revision = None
        if not self.is_leader:
            return
        self.is_leader = False
        self._leader_event.clear()
        log.warning("Lost snapshot leadership: %s", reason,
                    extra={"node_id": self.node_id, "term": self.term, "reason": reason})
        if self._on_change is not None:
            self._on_change(False)

    async def wait_leader(self) -> None:
        await self._leader_event.wait()

    # --- KV ---------------------------------------------------------------------------------
    async def kv(self) -> KeyValue:
        kv = self._kv
        if kv is None:
            kv = await open_bucket(self.js, self.bucket, self.ttl_ms, self.op_timeout,
                                   replicas=self.replicas, update_existing=self.update_existing)
            await self._check_ttl()
            self._kv = kv
            await self._watch()  # never touches self._kv
        return kv

    async def _check_ttl(self) -> None:
        """The bucket's max_age is the lease TTL: renew fast enough for the one it really has."""
        try:
            ttl = await bucket_ttl(self.js, self.bucket, self.op_timeout)
        except Exception as exc:
            log.debug("cannot read the lease bucket's TTL: %s", exc)
            return
        if ttl is None:
            log.warning("KV bucket %s has no TTL: a dead leader's lease would never expire; "
                        "recreate it (it is created with max_age = snapshot.leader_ttl)",
                        self.bucket)
        elif ttl * 1000 < self.ttl_ms * 0.99:
            self.heartbeat = min(self.heartbeat, heartbeat_seconds(int(ttl * 1000)))
            self.op_timeout = min(self.op_timeout, op_timeout_seconds(self.heartbeat))
            log.warning("KV bucket %s has a TTL of %.1f s, below snapshot.leader_ttl; renewing "
                        "every %.1f s", self.bucket, ttl, self.heartbeat)

    async def _watch(self) -> None:
        """React at once when the lease key is deleted or written by someone else."""
        if self.nc is None or self._sub is not None:
            return

        async def seen(msg: Msg) -> None:
            op = (msg.headers or {}).get(KV_OP_HEADER)
            if op in ("DEL", "PURGE"):
                if not self.is_leader:
                    self._wake.set()  # handed over: try to take it now
            elif self.is_leader and parse_value(msg.data).get("token") != self.token:
                self._wake.set()  # renew at once and find out whether it is still ours

        try:
            self._sub = await self.nc.subscribe(kv_subject(self.bucket, LEASE_KEY), cb=seen)
        except Exception as exc:
            log.debug("cannot watch the lease key: %s", exc)

    async def _try_acquire(self, kv: KeyValue) -> None:
        value = lease_value(self.node_id, self.token)
        try:
            rev = await bounded(kv.create(LEASE_KEY, value), self.op_timeout)
            self._became(rev, "lease created")
            return
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await bounded(kv.get(LEASE_KEY), self.op_timeout)
        except KeyNotFoundError:
            return  # expired or deleted between the two calls: next attempt
        held = parse_value(entry.value)
        if held.get("token") == self.token:
            # Our own earlier write (a call that timed out here but reached the server): it
            # names this very process, so taking it back at its revision is a plain CAS.
            rev = await bounded(kv.update(LEASE_KEY, value, last=entry.revision),
                                self.op_timeout)
            self._became(rev, "own lease recovered")
            return
        holder = held.get("node_id")
        self.holder = holder if isinstance(holder, int) else None

    async def _renew(self, kv: KeyValue) -> None:
        rev = await bounded(
            kv.update(LEASE_KEY, lease_value(self.node_id, self.token), last=self.revision),
            self.op_timeout)
        self.revision = rev

    async def tick(self) -> bool:
        """One heartbeat: renew when leader, try to acquire otherwise. False when NATS failed."""
        async with self._ops:
            if not self._is_connected():
                self.step_down("NATS disconnected")
                return False
            if self._not_eligible():
                if self.is_leader:
                    await self._hand_over(self.ineligible or "")
                return True
            try:
                kv = await self.kv()
                if self.is_leader:
                    await self._renew(kv)
                else:
                    await self._try_acquire(kv)
                self._bucket_reachable()
                return True
            except KeyWrongLastSequenceError as exc:
                self.step_down(describe(exc))
                self._bucket_reachable()
                return True
            except Exception as exc:
                self.step_down(describe(exc))
                self._kv = None  # reopen (recreate if it is gone) the bucket next time
                if self._bucket_error is None:  # once per outage, not every retry
                    log.warning("cannot use the snapshot lease bucket %s (retrying): %s",
                                self.bucket, describe(exc), extra={"node_id": self.node_id})
                self._bucket_error = describe(exc)
                return False

    def _bucket_reachable(self) -> None:
        if self._bucket_error is not None:
            log.info("the snapshot lease bucket %s answers again", self.bucket,
                     extra={"node_id": self.node_id})
            self._bucket_error = None

    def stale(self) -> str | None:
        """Why this node may not lead (or capture) right now; None when it may."""
        return self._eligible()

    def _not_eligible(self) -> bool:
        """Ask the node whether it may lead; log each change of the answer once."""
        reason = self._eligible()
        if reason != self.ineligible:
            if reason is not None:
                log.info("not taking the snapshot lease while %s", reason,
                         extra={"node_id": self.node_id})
            elif self.ineligible is not None:
                log.info("eligible for the snapshot lease again", extra={"node_id": self.node_id})
            self.ineligible = reason
        return reason is not None

    async def _hand_over(self, reason: str) -> None:
        """Give the lease up at once (deleted at our revision, so a fresher node takes it)."""
        revision = self.revision
        self.step_down(reason)
        if revision is None or self._kv is None:
            return
        try:
            await bounded(self._kv.delete(LEASE_KEY, last=revision), self.op_timeout)
        except Exception as exc:  # no quorum, say: the lease then expires with the bucket TTL
            log.debug("cannot delete the snapshot lease (it expires by itself): %s",
                      describe(exc))

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            ok = await self.tick()
            self._failures = 0 if ok else self._failures + 1
            delay = self.heartbeat if ok else backoff_seconds(self.heartbeat, self._failures - 1)
            if ok and self.ineligible is not None:
                # Asking the node costs nothing: look again soon rather than a heartbeat later
                # (at start no node is eligible until its consumers read the stream heads).
                delay = min(delay, ELIGIBILITY_RECHECK_SECONDS)
            await wait_any(stop, self._wake, timeout=delay)

    # --- fencing and release ----------------------------------------------------------------
    async def confirm(self, term: int) -> None:
        """The fence: renew at the current revision if still leader in ``term``, else LeaseLost."""
        async with self._ops:
            if not self.is_leader or self.term != term:
                raise LeaseLost(f"snapshot lease not held since term {term} began")
            reason = self._eligible()
            if reason is not None:
                raise LeaseLost(f"this node fell behind during the capture: {reason}")
            try:
                await self._renew(await self.kv())
            except Exception as exc:
                self.step_down(describe(exc))
                raise LeaseLost(f"snapshot lease lost before commit: {describe(exc)}") from exc

    async def release(self) -> None:
        """Graceful stop: delete the lease at our revision so another node takes over at once."""
        async with self._ops:
            if self._sub is not None:
                with contextlib.suppress(Exception):
                    await bounded(self._sub.unsubscribe(), self.op_timeout)
                self._sub = None
            if not self.is_leader or self.revision is None:
                return
            revision = self.revision
            try:
                if self._is_connected():
                    kv = await self.kv()
                    await bounded(kv.delete(LEASE_KEY, last=revision), self.op_timeout)
                    log.info("Released snapshot leadership", extra={"node_id": self.node_id,
                                                                  "term": self.term})
            except Exception as exc:
                log.warning("could not delete the snapshot lease (it expires by itself): %s",
                            describe(exc))
            self.is_leader = False
            self.revision = None
            self._leader_event.clear()
            if self._on_change is not None:
                self._on_change(False)
