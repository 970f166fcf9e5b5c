"""The snapshot store as every node sees it: opened on first use and listed now and then.

Every node lists the store (not only the leader): a node that is not the leader learns of a new
snapshot only this way, and reports it to the metrics so that health knows the recovery point.
Errors of the store while a cluster re-forms (a 503 on every listing) are logged once per state
change and retried with a growing wait (``aio.Backoff``), not in a tight loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from harmonylite.aio import Backoff
from harmonylite.bus.kv import bounded, describe
from harmonylite.config import Config
from harmonylite.ops.health import snapshot_age_limit
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.storage.base import ObjectStore

log = logging.getLogger(__name__)

StoreOpener = Callable[[], Awaitable[ObjectStore]]
LIST_TIMEOUT_SECONDS = 60.0
REFRESH_MIN_SECONDS = 1.0  # a store is listed at most this often
REFRESH_BACKOFF_MAX = 30.0  # longest wait between listings while the store keeps failing
LIST_QUIET_SECONDS = 15.0  # listing failures shorter than this are not logged


def refresh_period(cfg: Config) -> float:
    """Seconds between a node's listings of the store. A node that is not the leader learns of
    a new snapshot only by listing: it must list well within the health limit, or an idle,
    healthy cluster reports the snapshot the leader just took as missing (503)."""
    period = min(60.0, cfg.snapshot.leader_ttl / 1000.0)
    limit = snapshot_age_limit(cfg.health_check, cfg.snapshot.interval)
    if limit is not None:
        period = min(period, limit / 4)
    return max(REFRESH_MIN_SECONDS, period)


def listing_backoff(check_every: float) -> Backoff:
    """The wait between listings while they fail: twice the check period at first, doubling up
    to 32 check periods, and never more than ``REFRESH_BACKOFF_MAX``."""
    return Backoff(min(REFRESH_BACKOFF_MAX, 2 * check_every),
                   min(REFRESH_BACKOFF_MAX, 32 * check_every))


class StoreListing:
    """The store, opened on first use (a failure to open is said once until it opens), and its
    listing: the snapshots found, newest first, or None while listing fails."""

    def __init__(self, open_store: StoreOpener, *, check_every: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._open_store = open_store
        self._clock = clock
        self.store: ObjectStore | None = None
        self._store_error: str | None = None
        self._error: str | None = None
        self._failing_since = 0.0
        self._warned = False
        self._backoff = listing_backoff(check_every)

    @property
    def failing(self) -> bool:
        """The last listing failed: nothing is due until the store answers again."""
        return self._error is not None

    async def open(self) -> ObjectStore | None:
        """The store, or None while it cannot be opened (tried again on the next call)."""
        if self.store is None:
            try:
                self.store = await self._open_store()
                self._store_error = None
            except Exception as exc:
                if self._store_error is None:
                    log.warning("snapshot store unavailable: %s", describe(exc))
                self._store_error = describe(exc)
        return self.store

    async def list(self) -> list[Manifest] | None:
        """The committed snapshots, newest first; None when the store cannot be opened or
        listed (the failure is logged once it lasts ``LIST_QUIET_SECONDS``)."""
        store = await self.open()
        if store is None:
            return None
        try:
            found = await bounded(list_snapshots(store), LIST_TIMEOUT_SECONDS)
        except Exception as exc:
            # A cluster forming or re-forming answers 503 for seconds: retried quietly, said
            # once only if it lasts.
            now = self._clock()
            if self._error is None:
                self._failing_since = now
            elif not self._warned and now - self._failing_since >= LIST_QUIET_SECONDS:
                log.warning("cannot list snapshots for %.0f s (retrying with a growing wait): "
                            "%s", now - self._failing_since, describe(exc))
                self._warned = True
            self._error = describe(exc)
            return None
        if self._warned:
            log.info("snapshots can be listed again")
        self._error, self._warned = None, False
        self._backoff.reset()
        return found

    async def wait(self, *events: asyncio.Event | None) -> None:
        """The wait after a failed listing, growing while they keep failing, or until one of
        ``events`` is set."""
        await self._backoff.wait(*events)

    async def close(self) -> None:
        if self.store is not None:
            with contextlib.suppress(Exception):
                await self.store.aclose()
            self.store = None
