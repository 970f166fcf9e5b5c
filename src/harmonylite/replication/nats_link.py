"""Connecting to NATS (external servers or the embedded one) and creating the change streams."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from harmonylite.config import Config, NatsConfig
from harmonylite.errors import NatsError

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]
MIN_RECONNECT_WAIT = 0.25
NO_SUITABLE_PEERS = 10005  # JetStream error code


@dataclass
class LinkState:
    connected: bool = False
    closing: bool = False  # set before a deliberate close, so it is not reported as an outage
    on_reconnect: list[Callback] = field(default_factory=list)


def _tls_context(cfg: NatsConfig) -> ssl.SSLContext | None:
    if not (cfg.ca_file or cfg.cert_file):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    return ctx


async def connect(cfg: NatsConfig, urls: list[str], name: str, state: LinkState) -> Client:
    """Connect, trying ``connect_retries`` more times; once connected, reconnect forever."""

    async def disconnected() -> None:
        if state.connected and not state.closing:
            log.warning("disconnected from NATS")
        state.connected = False

    async def reconnected() -> None:
        state.connected = True
        log.info("reconnected to NATS")
        for cb in state.on_reconnect:
            await cb()

    async def error_cb(exc: Exception) -> None:
        log.debug("NATS client error: %s", exc)

    options: dict[str, object] = {
        "servers": urls,
        "name": name,
        # nats-py retries with no pause at all when this is 0: keep a floor, so a node whose
        # server is gone waits instead of spinning a core.
        "reconnect_time_wait": max(cfg.reconnect_wait_seconds, MIN_RECONNECT_WAIT),
        "max_reconnect_attempts": -1,
        "connect_timeout": 5,
        "disconnected_cb": disconnected,
        "reconnected_cb": reconnected,
        "error_cb": error_cb,
        "tls": _tls_context(cfg),
        # First URL first, also on reconnects (see docs/jetstream-cluster.md).
        "dont_randomize": not cfg.randomize_urls,
    }
    if cfg.user_name:
        options["user"] = cfg.user_name
        options["password"] = cfg.user_password
    if cfg.seed_file:
        options["nkeys_seed"] = cfg.seed_file
    # The first connection fails fast (with reconnects allowed nats-py would retry a refused
    # login forever); connect_retries bounds it. Once connected, reconnect forever.
    options["allow_reconnect"] = False
    last: Exception | None = None
    for attempt in range(cfg.connect_retries + 1):
        try:
            nc = await asyncio.wait_for(nats.connect(**options), 15)  # type: ignore[arg-type]
            nc.options["allow_reconnect"] = True
            state.connected = True
            return nc
        except Exception as exc:  # nats-py raises several unrelated types on connect
            last = exc
            log.warning("cannot connect to NATS (attempt %d of %d): %s", attempt + 1,
                        cfg.connect_retries + 1, exc)
            if attempt < cfg.connect_retries:
                await asyncio.sleep(max(cfg.reconnect_wait_seconds, 0.2))
    raise NatsError(f"cannot connect to NATS at {', '.join(urls)}: {last}") from last


def describe_error(exc: BaseException) -> str:
    """A short, stable description of a NATS error, for logs that say each state once."""
    if isinstance(exc, APIError):
        return f"{exc.code or ''} {exc.description or type(exc).__name__}".strip()
    if isinstance(exc, NatsTimeoutError | TimeoutError | asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def stream_config(cfg: Config, shard: int) -> StreamConfig:
    rl = cfg.replication_log
    return StreamConfig(
        name=cfg.names.stream(shard),
        subjects=[cfg.names.subject(shard)],
        max_msgs=rl.max_entries,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=rl.replicas,
        duplicate_window=120.0,
    )


async def ensure_streams(js: JetStreamContext, cfg: Config, timeout: float = 60.0) -> None:
    """Create each shard's stream; update an existing one only when update_existing is set."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    next_note = loop.time() + 5
    for shard in range(1, cfg.replication_log.shards + 1):
        want = stream_config(cfg, shard)
        while True:
            try:
                try:
                    info = await js.stream_info(want.name or "")
                except NotFoundError:
                    await js.add_stream(want)
                    log.info("created stream %s", want.name)
                    break
                have = info.config
                differs = (have.max_msgs, have.num_replicas) != (want.max_msgs, want.num_replicas)
                if differs and cfg.replication_log.update_existing:
                    await js.update_stream(want)
                    log.info("updated stream %s", want.name)
                elif differs:
                    log.warning(
                        "stream %s exists with max_msgs=%s replicas=%s (configured %s, %s); set "
                        "replication_log.update_existing = true to change it",
                        want.name, have.max_msgs, have.num_replicas, want.max_msgs,
                        want.num_replicas,
                    )
                break
            except (APIError, NatsTimeoutError, NoRespondersError, TimeoutError) as exc:
                # A fresh JetStream cluster times out or answers 503 until it has elected its meta
                # leader: keep trying until the deadline. Anything else (a subject taken by
                # another stream, bad limits) will not get better by waiting.
                # "No suitable peers" (10005) is a cluster still gathering its servers: an R3
                # stream can be placed once three have joined.
                transient = not isinstance(exc, APIError) or exc.code in (
                    None, 408, 500, 503) or exc.err_code == NO_SUITABLE_PEERS
                if not transient:
                    raise NatsError(f"cannot create stream {want.name}: {exc}") from exc
                if loop.time() > deadline:
                    raise NatsError(f"cannot create stream {want.name} within {timeout:.0f}s: "
                                    f"{exc}") from exc
                if loop.time() > next_note:
                    log.warning("waiting for JetStream to create stream %s: %s", want.name, exc)
                    next_note = loop.time() + 5
                await asyncio.sleep(0.5)


async def ensure_replicas(js: JetStreamContext, stream: str, want: int, update: bool,
                          what: str, timeout: float = 5.0) -> int:
    """Make the stream behind a KV or object store bucket follow the configured replicas.

    A bucket created earlier (or by an older version, with one replica) keeps its replica count
    until told otherwise: it is raised when ``update`` (``replication_log.update_existing``)
    allows, and reported otherwise. Returns the replica count the bucket has now.
    """
    info = await asyncio.wait_for(js.stream_info(stream), timeout)
    have = info.config.num_replicas or 1
    if have >= want:
        return have
    if not update:
        log.warning("%s (stream %s) has %d replica(s), configured %d: a server failure can lose "
                    "it; set replication_log.update_existing = true to change it", what, stream,
                    have, want, extra={"stream": stream, "replicas": have, "configured": want})
        return have
    config = info.config
    config.num_replicas = want
    await asyncio.wait_for(js.update_stream(config), timeout)
    log.info("%s (stream %s) now has %d replicas (it had %d)", what, stream, want, have,
             extra={"stream": stream, "replicas": want})
    return want

