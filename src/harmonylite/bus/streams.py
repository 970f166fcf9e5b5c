"""Creating the change streams (and the replicas of the buckets) on a connected NATS.

The connection itself is :mod:`harmonylite.bus.connection`.
"""

from __future__ import annotations

import asyncio
import json
import logging

from nats.errors import Error as NatsClientError
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, NotFoundError

from harmonylite.aio import Patience
from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.errors import NatsError

log = logging.getLogger(__name__)

NO_SUITABLE_PEERS = 10005  # JetStream error code


def describe_error(exc: BaseException) -> str:
    """A short, stable description of a NATS error, for logs that say each state once."""
    if isinstance(exc, APIError):
        return f"{exc.code or ''} {exc.description or type(exc).__name__}".strip()
    if is_timeout(exc):
        return "timed out"
    return str(exc) or type(exc).__name__


STREAM_OFFLINE = 10118  # JetStream's err_code: every server holding the stream is down


def is_stream_offline(exc: BaseException) -> bool:
    """The cluster answered that the stream is offline: no node can read it, not just this one."""
    return isinstance(exc, APIError) and exc.err_code == STREAM_OFFLINE


def is_timeout(exc: BaseException) -> bool:
    return isinstance(exc, NatsTimeoutError | TimeoutError | asyncio.TimeoutError)


async def cluster_misses(js: JetStreamContext, stream: str, timeout: float) -> bool:
    """Whether the cluster itself cannot reach ``stream``: its meta leader's stream listing names
    it as missing (its servers did not answer) or offline. Asked after the stream's own requests
    time out: when the one server of a one-replica stream dies, those requests may time out for
    minutes before the cluster answers "offline" (10118), while the listing names the stream as
    missing within seconds. Any failure of the listing itself says nothing (False)."""
    try:
        msg = await js._nc.request(f"{js._prefix}.STREAM.LIST", b"{}", timeout=timeout)
        body = json.loads(msg.data or b"{}")
    except (NatsClientError, TimeoutError, ValueError) as exc:
        log.debug("cannot list the streams to tell whether %s is offline: %s", stream,
                  describe_error(exc))
        return False
    if not isinstance(body, dict):
        return False
    return stream in (body.get("missing") or []) or stream in (body.get("offline") or {})


LIST_TIMEOUT = 8.0  # the meta leader waits some seconds for the streams that do not answer


async def offline_for_all(js: JetStreamContext, stream: str, exc: BaseException) -> bool:
    """Whether ``exc``, met reading ``stream``, means that no node can read it now: the cluster
    answered "offline", or it timed out and the cluster cannot reach the stream either (a
    timeout alone does not tell a slow stream from one whose servers are all down)."""
    offline = is_stream_offline(exc) or (
        is_timeout(exc) and await cluster_misses(js, stream, LIST_TIMEOUT))
    if offline:
        log.info("the cluster cannot reach %s: no node can consume it meanwhile", stream,
                 extra={"stream": stream})
    return offline


def stream_config(cfg: Config, shard: int) -> StreamConfig:
    rl = cfg.replication_log
    return StreamConfig(
        name=namespace(cfg).stream(shard),
        subjects=[namespace(cfg).subject(shard)],
        max_msgs=rl.max_entries,
        discard=DiscardPolicy.OLD,
        storage=StorageType.FILE,
        num_replicas=rl.replicas,
        duplicate_window=120.0,
    )


async def ensure_streams(js: JetStreamContext, cfg: Config, timeout: float = 60.0) -> None:
    """Create each shard's stream; update an existing one only when update_existing is set."""
    loop = asyncio.get_running_loop()
    patience = Patience(timeout, 0.5)
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
                if patience.exhausted:
                    raise NatsError(f"cannot create stream {want.name} within {timeout:.0f}s: "
                                    f"{exc}") from exc
                if loop.time() > next_note:
                    log.warning("waiting for JetStream to create stream %s: %s", want.name, exc)
                    next_note = loop.time() + 5
                await patience.wait()


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


async def stream_heads(js: JetStreamContext, streams: list[str]) -> dict[str, int]:
    """Per stream, the first sequence it still holds (last + 1 when it holds none)."""
    heads: dict[str, int] = {}
    for name in streams:
        try:
            info = await js.stream_info(name)
        except NotFoundError:
            continue
        except Exception as exc:
            raise NatsError(f"cannot read the state of stream {name}: {exc}") from exc
        state = info.state
        heads[name] = state.first_seq if state.messages else state.last_seq + 1
    return heads
