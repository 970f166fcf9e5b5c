"""When the snapshot leader takes snapshots, and what every publisher does meanwhile.

Triggers (only while this node holds the lease):

- **interval**: ``snapshot.interval`` ms after the newest committed snapshot, whichever node took it
  (the store is listed at start and each time this node becomes leader); 0 disables the timer.
- **messages**: ``max_entries / 2`` messages have passed on any stream since the newest
  snapshot's sequences (each stream's last sequence against the manifest, checked every second),
  so a snapshot always exists inside the streams' retention (each stream keeps ``max_entries``).
- **request**: a node behind the streams asked for a snapshot (key ``snapshot-request``, see
  :mod:`harmonylite.snapshot.request`) that the newest one does not satisfy.

No capture is stored at exactly the newest snapshot's position (``SnapshotUnchanged``).
- **sleep timeout**: after ``sleep_timeout`` ms without anything published or replicated, the leader
  takes a final snapshot and the node stops (exit 0); a non-leader just stops.

One capture runs at a time. A trigger that comes while one runs (or while a manual save holds the
upload lock) is skipped with ``system busy capturing snapshot``. A failed attempt is logged and
counted, and not retried before the next trigger: one interval later, or ``max_entries / 2``
further messages. Losing the lease cancels a running capture; its fence would refuse the commit
anyway. Every node lists the store now and then and reports the newest snapshot to the metrics, so
health knows the recovery point (and, with :mod:`harmonylite.snapshot.freshness`, whether it lacks
any change).

A capture starts only while the node is fresh (``LeaderElection.stale()``: applying, near the
stream heads), and the manifest records the heads it was captured against (``heads``), so
``snapshot verify`` can say how far behind the streams it was. Opening and listing the store
(and the growing wait while listings fail) is :mod:`harmonylite.snapshot.listing`; what makes a
snapshot due, :mod:`harmonylite.snapshot.triggers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from nats.js import JetStreamContext

from harmonylite.aio import wait_any
from harmonylite.bus.kv import bounded, describe
from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.errors import BUSY_MESSAGE, LeaseLost, SnapshotBusy
from harmonylite.ops.metrics import Metrics
from harmonylite.snapshot import request
from harmonylite.snapshot.leader import LeaderElection
from harmonylite.snapshot.listing import StoreListing, StoreOpener, refresh_period
from harmonylite.snapshot.manifest import Manifest
from harmonylite.snapshot.pipeline import HeadsPipeline, SaveResult, SnapshotUnchanged
from harmonylite.snapshot.triggers import check_period, count_threshold, snapshot_age, streams_past
from harmonylite.snapshot.upload_lock import UploadLock

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        cfg: Config,
        election: LeaderElection,
        open_store: StoreOpener,
        *,
        js: JetStreamContext,
        metrics: Metrics | None = None,
        activity: Callable[[], object] | None = None,
        on_sleep: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        heads: Callable[[], dict[str, int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.election = election
        self.js = js
        self.metrics = metrics
        self._activity = activity
        self._on_sleep = on_sleep
        self._clock = clock
        self.interval = cfg.snapshot.interval / 1000.0
        self.threshold = count_threshold(cfg.replication_log.max_entries,
                                         cfg.replication_log.shards)
        self.sleep_timeout = cfg.sleep_timeout / 1000.0
        self.check_every = check_period(election.heartbeat)
        self.refresh_every = refresh_period(cfg)
        self.listing = StoreListing(open_store, check_every=self.check_every, clock=clock)
        self.newest: Manifest | None = None
        self.saved: list[SaveResult] = []
        self._next_due: float | None = None  # interval trigger, monotonic
        self._count_base: dict[str, int] = {}
        self._capture: asyncio.Task[None] | None = None
        self._capture_reason = ""
        self._busy_logged = False
        self._seen_term = -1
        self._last_refresh = -1e18
        self._last_count_check = -1e18
        self._last_activity = clock()
        self._activity_mark: object = None
        self._wake = asyncio.Event()
        self._last_request_check = -1e18
        self._replace: str | None = None  # the newest snapshot, found unsound by a node
        self._heads = heads or dict

    # --- leadership -------------------------------------------------------------------------
    def leadership_changed(self, is_leader: bool) -> None:
        """Called by the election on each change; losing it cancels a running capture."""
        if not is_leader and self._capture is not None and not self._capture.done() \
                and asyncio.current_task() is not self._capture:
            log.warning("cancelling the running snapshot: leadership lost")
            self._capture.cancel()
        self._wake.set()

    # --- the newest snapshot -----------------------------------------------------------------
    def _adopt(self, manifest: Manifest, base: float | None = None) -> None:
        """``manifest`` is the newest committed snapshot: the triggers count from it."""
        self.newest = manifest
        if base is None:
            base = self._clock() - snapshot_age(manifest.created_at, time.time())
        if self.interval > 0:
            self._next_due = base + self.interval
        self._count_base = dict(manifest.sequences)
        if self.metrics is not None:
            self.metrics.snapshot_seen(manifest.id, manifest.created_at)

    async def refresh(self) -> bool:
        """List the store; adopt its newest snapshot when it is not the one we know."""
        found = await self.listing.list()
        if found is None:
            return False
        self._last_refresh = self._clock()
        if not found:
            if self.newest is None and self.interval > 0 and self._next_due is None:
                self._next_due = self._clock()  # nothing to recover from yet: take one now
            return True
        if self.newest is None or found[0].id != self.newest.id:
            self._adopt(found[0])
        elif self.metrics is not None:
            self.metrics.snapshot_seen(found[0].id, found[0].created_at)
        return True

    # --- triggers ---------------------------------------------------------------------------
    async def _last_sequences(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for name in namespace(self.cfg).streams():
            info = await bounded(self.js.stream_info(name), self.election.op_timeout)
            out[name] = int(info.state.last_seq)
        return out

    async def _count_trigger(self, now: float) -> str | None:
        last = self._heads()
        if not last:
            # No consumers to ask (a test, a node that does not replicate): the streams' heads
            # over NATS, once per check period.
            if now - self._last_count_check < self.check_every:
                return await self._requested(now)
            self._last_count_check = now
            try:
                last = await self._last_sequences()
            except Exception as exc:
                log.debug("cannot read the streams' last sequences: %s", exc)
                return None
        # Otherwise the heads as this node's consumers see them, updated with every message:
        # a busy stream can pass half its retention in well under a second.
        past = streams_past(last, self._count_base, self.threshold)
        if not past:
            return await self._requested(now)
        return f"{self.threshold} messages on {', '.join(past)}"

    async def _requested(self, now: float) -> str | None:
        """A node behind the streams asked for a snapshot the newest one does not satisfy.

        Looked at once per check period; a request stays open (and is looked at again after
        each capture) until a committed snapshot satisfies it or its node stops asking."""
        if now - self._last_request_check < self.check_every:
            return None
        self._last_request_check = now
        try:
            req = await request.read(await self.election.kv(), self.election.op_timeout)
        except Exception as exc:
            log.debug("cannot read the snapshot request: %s", describe(exc))
            return None
        if req is None:
            return None
        newest = self.newest
        if newest is not None and req.satisfied_by(newest.id, newest.sequences):
            return None
        if newest is not None and newest.id in req.unsound:
            # The newest fails a check where it is needed: a capture at its very position is
            # not "unchanged" then.
            self._replace = newest.id
        return f"requested by node {req.node_id}"

    def _interval_trigger(self, now: float) -> str | None:
        if self.interval <= 0:
            return None
        if self._next_due is None:
            self._next_due = now + self.interval
        return "interval" if now >= self._next_due else None

    def _capturing(self) -> bool:
        return self._capture is not None and not self._capture.done()

    def _rearm(self, now: float) -> None:
        """After an attempt that committed nothing: no retry before the next trigger."""
        if self.interval > 0:
            self._next_due = now + self.interval

    async def _rearm_count(self) -> None:
        with contextlib.suppress(Exception):
            self._count_base = await self._last_sequences()

    def _start(self, reason: str) -> None:
        if self._capturing():
            # Queued, not dropped: the triggers are looked at again the moment it ends.
            if not self._busy_logged:
                # The message trigger fires on nearly every look under heavy writes: only the
                # timer's is worth a warning.
                log.log(logging.WARNING if reason == "interval" else logging.DEBUG,
                        "%s: snapshot (%s) still running; %s trigger queued until it ends",
                        BUSY_MESSAGE, self._capture_reason, reason)
                self._busy_logged = True
            return
        self._busy_logged = False
        self._capture_reason = reason
        self._capture = asyncio.create_task(self.snapshot(reason, self.election.term))
        self._capture.add_done_callback(lambda _: self._wake.set())

    def poke(self) -> None:
        """Something was applied: look at the message trigger now."""
        self._wake.set()

    # --- one snapshot -----------------------------------------------------------------------
    async def snapshot(self, reason: str, term: int) -> None:
        """Take one snapshot under the lease of ``term`` and the upload lock."""
        started = self._clock()
        self._rearm(started)
        store = await self.listing.open()
        if store is None:
            return
        stale = self.election.stale()
        if stale is not None:
            log.info("no snapshot (%s trigger) while %s", reason, stale)
            return
        heads = self._heads()
        try:
            lock = UploadLock(await self.election.kv(), self.cfg.node_id,
                              heartbeat=self.election.heartbeat,
                              op_timeout=self.election.op_timeout, purpose="leader")
            await lock.acquire()
        except SnapshotBusy as exc:
            log.warning("%s; %s trigger skipped", exc, reason)
            await self._rearm_count()
            return
        except Exception as exc:
            log.warning("cannot take the snapshot upload lock: %s; %s trigger skipped",
                        describe(exc), reason)
            return

        async def fence() -> None:
            await self.election.confirm(term)
            await lock.confirm()

        log.info("taking a snapshot (%s)", reason, extra={"trigger": reason, "term": term})
        try:
            result = await HeadsPipeline(self.cfg, store, heads).save(
                fence=fence, unless_at=self._unless_at())
        except SnapshotUnchanged as exc:
            log.info("%s (%s trigger)", exc, reason)
            await self._rearm_count()
            return
        except SnapshotBusy as exc:
            log.warning("%s; %s trigger skipped", exc, reason)
            return
        except LeaseLost as exc:
            log.warning("snapshot not committed: %s", exc, extra={"trigger": reason})
            self._fail(exc)
            return
        except Exception as exc:
            log.error("snapshot failed (%s trigger): %s", reason, describe(exc),
                      extra={"trigger": reason})
            self._fail(exc)
            await self._rearm_count()
            return
        finally:
            await lock.release()
        self.saved.append(result)
        manifest = result.manifest
        if self.metrics is not None:
            self.metrics.snapshot_saved(result.duration, manifest.stored_bytes,
                                        manifest.created_at, snapshot_id=manifest.id)
        # The next interval counts from the moment the manifest names (its created_at), not from
        # the trigger: on a busy machine the capture may start well after the trigger fired.
        self._adopt(manifest)

    def _unless_at(self) -> dict[str, int] | None:
        """No capture at exactly the newest snapshot's position, unless that one is unsound."""
        if self.newest is None or self.newest.id == self._replace:
            return None
        return self.newest.sequences

    def _fail(self, exc: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.snapshot_failed(exc)

    # --- activity and sleep -----------------------------------------------------------------
    def _idle_for(self, now: float) -> float:
        if self._activity is None:
            return 0.0
        mark = self._activity()
        if mark != self._activity_mark:
            self._activity_mark = mark
            self._last_activity = now
        return now - self._last_activity

    async def _sleep(self, idle: float) -> None:
        if self.election.is_leader:
            log.info("no activity for %.1f s (sleep_timeout): taking a final snapshot, then "
                     "stopping", idle)
            if self._capture is not None:
                with contextlib.suppress(BaseException):
                    await self._capture
            if self.election.is_leader:
                self._capture_reason = "sleep timeout"
                self._capture = asyncio.create_task(
                    self.snapshot("sleep timeout", self.election.term))
                with contextlib.suppress(BaseException):
                    await self._capture
        else:
            log.info("no activity for %.1f s (sleep_timeout): stopping", idle)
        if self._on_sleep is not None:
            self._on_sleep()

    # --- the loop ---------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        await self.refresh()
        try:
            while not stop.is_set():
                await self._wait(stop)
                if stop.is_set():
                    break
                now = self._clock()
                if self.sleep_timeout > 0:
                    idle = self._idle_for(now)
                    if idle >= self.sleep_timeout:
                        await self._sleep(idle)
                        return
                leader = self.election.is_leader
                if leader and self._seen_term != self.election.term:
                    # Newly leader: count from the newest snapshot in the store, whoever took it.
                    if not await self.refresh():
                        continue
                    self._seen_term = self.election.term
                elif now - self._last_refresh >= self.refresh_every:
                    await self.refresh()
                if not leader or not self.election.is_leader:
                    continue
                reason = self._interval_trigger(now) or await self._count_trigger(now)
                if reason is not None:
                    self._start(reason)
        finally:
            await self.cancel_capture()

    async def _wait(self, stop: asyncio.Event) -> None:
        self._wake.clear()
        if self.listing.failing:
            # The store keeps failing: nothing is due until it answers again.
            await self.listing.wait(stop, self._wake)
            return
        delay = self.check_every
        if self._next_due is not None and self.election.is_leader and not self._capturing():
            delay = max(0.0, min(delay, self._next_due - self._clock()))
        await wait_any(stop, self._wake, timeout=delay)

    async def cancel_capture(self) -> None:
        if self._capture is not None and not self._capture.done():
            self._capture.cancel()
            with contextlib.suppress(BaseException):
                await self._capture

    async def close(self) -> None:
        await self.cancel_capture()
        await self.listing.close()
