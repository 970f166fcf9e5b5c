"""What a node shows the outside: its health and metrics servers, its heartbeats."""

from __future__ import annotations

from collections.abc import Callable

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.cluster.heartbeat import Buckets, HeartbeatPublisher
from harmonylite.cluster.read import ClusterReader
from harmonylite.config import Config
from harmonylite.node.heartbeat_state import LeaseSource, StatusSource, collector
from harmonylite.ops.health import start_health_server
from harmonylite.ops.http_server import HttpServer
from harmonylite.ops.metrics import Metrics, start_metrics_server


async def start_servers(cfg: Config, health: StatusSource, metrics: Metrics,
                        js: Callable[[], JetStreamContext | None]) -> list[HttpServer]:
    """The health server (with the live cluster page) and the metrics server, as configured."""
    servers = []
    if cfg.health_check.enable:
        # The live page reads the heartbeats of every node, this one's included.
        names = namespace(cfg)
        reader = ClusterReader(js, names.heartbeat_bucket, names.last_seen_bucket)
        servers.append(await start_health_server(
            cfg.health_check, health, snapshot_interval_ms=cfg.snapshot.interval,
            snapshot_enabled=cfg.snapshot.enabled, cluster=reader.document))
    if cfg.prometheus.enable:
        servers.append(await start_metrics_server(cfg.prometheus, metrics))
    return servers


def heartbeats(cfg: Config, js: JetStreamContext, health: StatusSource, lease: LeaseSource,
               connected: Callable[[], bool]) -> HeartbeatPublisher:
    """This node's state in the cluster's heartbeat bucket every second (cluster status, the
    live page)."""
    buckets = Buckets(namespace(cfg).heartbeat_bucket, namespace(cfg).last_seen_bucket,
                      replicas=cfg.replication_log.replicas,
                      update_existing=cfg.replication_log.update_existing)
    return HeartbeatPublisher(js, cfg.node_id, buckets, collector(cfg, health, lease), connected)
