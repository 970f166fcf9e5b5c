"""Prometheus metrics of one node, in a private registry, served as text on ``/metrics``.

The node calls plain methods (``published(n)``, ``snapshot_saved(...)``, ``leader_changed(b)``…);
every metric lives in the node's own :class:`CollectorRegistry`, so several nodes can run in one
process. Names are ``{namespace}_[{subsystem}_]name``. The object also remembers the snapshot facts
the health endpoint reports (:meth:`Metrics.snapshot_state`).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from harmonylite import __version__
from harmonylite.config import PrometheusConfig
from harmonylite.errors import ConfigError
from harmonylite.ops.health import to_epoch
from harmonylite.ops.http_server import HttpServer, Response
from harmonylite.redact import redact

SNAPSHOT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, math.inf)
_NAME_PART = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Clock = Callable[[], float]


def _check_name(key: str, value: str) -> None:
    if value and not _NAME_PART.match(value):
        raise ConfigError(key, value, "must be letters, digits and underscores, not starting "
                          "with a digit")


class Metrics:
    """Every metric of one node. Methods are cheap and may be called from any thread."""

    def __init__(
        self,
        namespace: str = "harmonylite",
        subsystem: str = "",
        *,
        registry: CollectorRegistry | None = None,
        node_id: int | None = None,
        clock: Clock = time.time,
    ) -> None:
        _check_name("prometheus.namespace", namespace)
        _check_name("prometheus.subsystem", subsystem)
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        self._leader = False
        self._last_id: str | None = None
        self._last_at: float | None = None
        self._last_error: str | None = None
        self._age_source: Callable[[], float | None] | None = None
        self._freshness_source: Callable[[], tuple[bool, float | None]] | None = None
        self._nats_source: Callable[[], bool] | None = None
        self._nats_connected = False
        ns: dict[str, Any] = {"namespace": namespace, "subsystem": subsystem,
                              "registry": self.registry}

        self.info = Gauge("build_info", "Always 1; labels carry the version and node id.",
                          ["version", "node_id"], **ns)
        self.info.labels(__version__, "" if node_id is None else str(node_id)).set(1)

        # Snapshots.
        self.snapshot_age_seconds = Gauge(
            "snapshot_age_seconds", "Seconds since the newest committed snapshot was taken "
            "(NaN until one is known).", **ns)
        self.snapshot_age_seconds.set_function(self._age_value)
        self.snapshot_staleness_seconds = Gauge(
            "snapshot_staleness_seconds", "Seconds since the first change the newest committed "
            "snapshot lacks (0 while it holds every change, however old it is; NaN until one is "
            "known).", **ns)
        self.snapshot_staleness_seconds.set_function(self._staleness_value)
        self.snapshot_last_timestamp_seconds = Gauge(
            "snapshot_last_timestamp_seconds", "Unix time of the newest committed snapshot "
            "(0 until one is known).", **ns)
        self.snapshot_duration_seconds = Histogram(
            "snapshot_duration_seconds", "Time to capture, upload, verify and commit a snapshot.",
            buckets=SNAPSHOT_BUCKETS, **ns)
        self.snapshot_bytes = Gauge(
            "snapshot_bytes", "Stored size of the last snapshot this node saved.", **ns)
        self.snapshot_failures_total = Counter(
            "snapshot_failures", "Snapshot attempts that failed.", **ns)
        self.snapshot_leader = Gauge(
            "snapshot_leader", "1 while this node holds the snapshot lease, else 0.", **ns)
        self.leadership_changes_total = Counter(
            "leadership_changes", "Times this node gained or lost the snapshot lease.", **ns)
        self.upload_bytes_per_second = Gauge(
            "upload_bytes_per_second", "Throughput of the last snapshot upload.", **ns)
        self.restores_total = Counter(
            "restores", "Snapshots restored into this node's database.", **ns)

        # Replication.
        self.published_total = Counter(
            "published", "Changes this node published to JetStream.", **ns)
        self.replicated_total = Counter(
            "replicated", "Changes applied to this node's database from the streams.", **ns)
        self.pending_publish = Gauge(
            "pending_publish", "Captured changes not yet acknowledged by JetStream.", **ns)
        self.apply_failures_total = Counter(
            "apply_failures", "Stream messages not applied whole: the changes that failed are "
            "in the dead-letter table.", **ns)
        self.replication_lag_seconds = Gauge(
            "replication_lag_seconds", "For the last applied message: apply time minus its "
            "publish time.", **ns)
        self.dead_letters_total = Counter(
            "dead_letters", "Incoming changes put in the dead-letter table (never applied).",
            **ns)
        self.apply_stalled = Gauge(
            "apply_stalled", "Streams whose consumer cannot apply right now (transient error).",
            **ns)
        self.stream_lag_messages = Gauge(
            "stream_lag_messages", "Messages the stream holds beyond this node's position.",
            ["stream"], **ns)
        self.stream_applied_sequence = Gauge(
            "stream_applied_sequence", "Last stream sequence applied by this node.", ["stream"],
            **ns)
        self.conflicts = Gauge(
            "conflicts", "Rows displaced or overwritten by conflicts on this node and recorded "
            "(harmonylite conflicts list).", **ns)
        self.parked_changes = Gauge(
            "parked_changes", "Incoming changes waiting for this database's schema (a table or "
            "column it lacks).", **ns)
        self.stream_gaps_total = Counter(
            "stream_gaps", "Times a stream was found to have dropped messages this node had not "
            "applied.", **ns)
        # The archive of the streams (snapshot.archive), on the node that writes it.
        self.archive_lag_messages = Gauge(
            "archive_lag_messages", "Messages a stream holds beyond its archive (on the "
            "snapshot leader, which writes the archive).", ["stream"], **ns)
        self.archive_segment_age_seconds = Gauge(
            "archive_segment_age_seconds", "Seconds since the server time of the newest "
            "archived message (NaN where no archive is written).", **ns)
        self.archive_segment_age_seconds.set_function(self._archive_age_value)
        self._archive_age_source: Callable[[], float | None] | None = None
        self.nats_connected = Gauge(
            "nats_connected", "1 while the NATS connection is up, else 0.", **ns)
        self.nats_connected.set_function(self._nats_value)

    @classmethod
    def from_config(cls, cfg: PrometheusConfig, *, node_id: int | None = None) -> Metrics:
        return cls(cfg.namespace, cfg.subsystem, node_id=node_id)

    # --- replication ---------------------------------------------------------------------------
    def published(self, n: int = 1) -> None:
        if n > 0:
            self.published_total.inc(n)

    def replicated(self, n: int = 1, *, published_at: float | None = None) -> None:
        """``n`` changes applied; ``published_at`` (Unix time) of the last one sets the lag."""
        if n > 0:
            self.replicated_total.inc(n)
        if published_at is not None:
            self.observe_lag(self._clock() - published_at)

    def observe_lag(self, seconds: float) -> None:
        self.replication_lag_seconds.set(max(0.0, seconds))

    def set_pending(self, n: int) -> None:
        self.pending_publish.set(max(0, n))

    def apply_failed(self, n: int = 1) -> None:
        if n > 0:
            self.apply_failures_total.inc(n)

    def dead_lettered(self, n: int = 1) -> None:
        if n > 0:
            self.dead_letters_total.inc(n)

    def stream_state(self, stream: str, applied: int, lag: int) -> None:
        self.stream_applied_sequence.labels(stream).set(applied)
        self.stream_lag_messages.labels(stream).set(lag)

    def gap_found(self) -> None:
        self.stream_gaps_total.inc()

    def set_nats_connected(self, connected: bool) -> None:
        self._nats_connected = bool(connected)

    def track_nats_connected(self, source: Callable[[], bool]) -> None:
        """Read the connection state from ``source`` at every scrape."""
        self._nats_source = source

    # --- archive -------------------------------------------------------------------------------
    def archive_state(self, stream: str, lag: int) -> None:
        self.archive_lag_messages.labels(stream).set(max(0, lag))

    def track_archive_age(self, source: Callable[[], float | None]) -> None:
        """Read the newest archived message's age from ``source`` at every scrape."""
        self._archive_age_source = source

    def _archive_age_value(self) -> float:
        if self._archive_age_source is None:
            return math.nan
        try:
            age = self._archive_age_source()
        except Exception:
            return math.nan
        return math.nan if age is None else float(age)

    # --- snapshots -----------------------------------------------------------------------------
    def snapshot_saved(
        self,
        duration: float,
        nbytes: int,
        at: object = None,
        *,
        snapshot_id: str | None = None,
        upload_seconds: float | None = None,
    ) -> None:
        """A snapshot this node took was committed; ``at`` is its time (defaults to now)."""
        self.snapshot_duration_seconds.observe(max(0.0, duration))
        self.snapshot_bytes.set(max(0, nbytes))
        if upload_seconds is not None:
            self.uploaded(nbytes, upload_seconds)
        self._last_error = None
        self.snapshot_seen(snapshot_id, self._clock() if at is None else at)

    def snapshot_seen(self, snapshot_id: str | None, at: object) -> None:
        """The newest committed snapshot known (any node's); an older one than known is ignored."""
        ts = to_epoch(at)
        if ts is None or (self._last_at is not None and ts < self._last_at):
            return
        self._last_at = ts
        self._last_id = snapshot_id
        self.snapshot_last_timestamp_seconds.set(ts)

    def snapshot_failed(self, error: BaseException | str | None = None) -> None:
        self.snapshot_failures_total.inc()
        if error is not None:
            text = str(error) or type(error).__name__
            self._last_error = redact(text)

    def uploaded(self, nbytes: int, seconds: float) -> None:
        if seconds > 0:
            self.upload_bytes_per_second.set(nbytes / seconds)

    def leader_changed(self, is_leader: bool) -> None:
        """Report the lease state; only a change of state counts as a leadership change."""
        is_leader = bool(is_leader)
        if is_leader != self._leader:
            self.leadership_changes_total.inc()
        self._leader = is_leader
        self.snapshot_leader.set(1 if is_leader else 0)

    def restored(self, snapshot_id: str | None = None, at: object = None) -> None:
        self.restores_total.inc()
        if at is not None:
            self.snapshot_seen(snapshot_id, at)

    def track_snapshot_age(self, source: Callable[[], float | None]) -> None:
        """Compute ``snapshot_age_seconds`` with ``source`` at every scrape (None: unknown)."""
        self._age_source = source

    def snapshot_age(self) -> float | None:
        if self._age_source is not None:
            return self._age_source()
        if self._last_at is None:
            return None
        return max(0.0, self._clock() - self._last_at)

    def track_snapshot_freshness(self, source: Callable[[], tuple[bool, float | None]]) -> None:
        """Read ``(known, since)`` from ``source``: whether a newest snapshot is known, and the
        Unix time of the first change it lacks (None: it lacks none)."""
        self._freshness_source = source

    def snapshot_staleness(self) -> float | None:
        """Seconds since the first change the newest snapshot lacks; 0 when it lacks none,
        None when unknown."""
        if self._freshness_source is None:
            return None
        known, since = self._freshness_source()
        if not known:
            return None
        return 0.0 if since is None else max(0.0, self._clock() - since)

    def snapshot_state(self) -> dict[str, Any]:
        """The ``snapshot`` part of the health document."""
        state = {
            "leader": self._leader,
            "last_id": self._last_id,
            "last_at": self._last_at,
            "age_seconds": self.snapshot_age(),
            "last_error": self._last_error,
        }
        if self._freshness_source is not None:
            known, since = self._freshness_source()
            if known:
                # Present only when known: health then judges freshness by it, not by the age.
                state["unsaved_change_at"] = since
        return state

    # --- export --------------------------------------------------------------------------------
    def render(self) -> bytes:
        return bytes(generate_latest(self.registry))

    def _age_value(self) -> float:
        try:
            age = self.snapshot_age()
        except Exception:
            return math.nan
        return math.nan if age is None else float(age)

    def _staleness_value(self) -> float:
        try:
            staleness = self.snapshot_staleness()
        except Exception:
            return math.nan
        return math.nan if staleness is None else float(staleness)

    def _nats_value(self) -> float:
        if self._nats_source is None:
            return 1.0 if self._nats_connected else 0.0
        try:
            return 1.0 if self._nats_source() else 0.0
        except Exception:
            return 0.0


async def start_metrics_server(cfg: PrometheusConfig, metrics: Metrics) -> HttpServer:
    """Serve ``GET /metrics`` on ``cfg.bind``; ``server.port`` is the bound port."""

    async def handle() -> Response:
        return Response(200, metrics.render(), CONTENT_TYPE_LATEST)

    return await HttpServer({"/metrics": handle}, "metrics").start(cfg.bind, "prometheus.bind")
