"""One live node per node_id: a claim in the cluster's lease bucket (``e-harmonylite`` by
default), key ``node-<id>``.

Two nodes with the same ``node_id`` (set the same by hand, or both left to the machine-id default
on a cloned machine) are one name for two writers: the cluster view, the schema registry, the
snapshot manifests and the conflict records could no longer tell them apart. A starting node
therefore claims its id with ``kv.create`` and renews the claim every heartbeat; the value names
the process (host, boot, pid, database path, a random instance token).

A claim found at start is either a live node's or one left by a process that died:

- left on this machine (same host and boot) for this same database by a process that no longer
  exists: a crash of this very node, taken over at once;
- otherwise the starting node watches it for two of its holder's heartbeats: renewed, a live node
  holds the id and the start is refused (exit 2) with both nodes named; not renewed, it is stale
  and taken over.

A running node that finds its claim taken by another process stops the same way. The claim is
deleted on a clean stop; a crashed node's expires with the bucket's TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from harmonylite.bus.kv import (
    bounded,
    bucket_ttl,
    heartbeat_seconds,
    op_timeout_seconds,
    open_bucket,
    parse_value,
)
from harmonylite.bus.names import node_key
from harmonylite.errors import ConfigError
from harmonylite.node.server_lock import pid_alive

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
POLL_SECONDS = 0.25  # while watching another process's claim


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def describe(holder: dict[str, Any]) -> str:
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, instance "
            f"{holder.get('instance')}, database {holder.get('db_path')}")


class NodeIdInUse(ConfigError):
    """Another live process holds this node_id."""

    def __init__(self, node_id: int, mine: dict[str, Any], holder: dict[str, Any]) -> None:
        self.holder = holder
        super().__init__(
            "node_id", node_id,
            f"node_id {node_id} is already used by a live node ({describe(holder)}); this node "
            f"({describe(mine)}) cannot share it: set a distinct node_id in each node's "
            "configuration (or -node-id); left unset, node_id derives from the machine id, "
            "which a cloned machine shares")


class NodeClaim:
    def __init__(self, js: JetStreamContext, bucket: str, node_id: int, db_path: Path, *,
                 ttl_ms: int, replicas: int = 1) -> None:
        self.js = js
        self.bucket = bucket
        self.ttl_ms = ttl_ms
        self.replicas = replicas
        self.kv: KeyValue | None = None
        self.node_id = node_id
        self.key = node_key(node_id)
        self.heartbeat = heartbeat_seconds(ttl_ms)
        self.op_timeout = max(op_timeout_seconds(self.heartbeat), 2.0)
        self.mine: dict[str, Any] = {
            "node_id": node_id, "instance": secrets.token_hex(8), "host": socket.gethostname(),
            "boot": boot_id(), "pid": os.getpid(), "db_path": str(db_path.resolve()),
            "heartbeat": self.heartbeat}
        self.revision: int | None = None
        self.taken: NodeIdInUse | None = None  # set when another process took it while running

    def _value(self) -> bytes:
        return json.dumps({**self.mine, "since": time.time()}).encode()

    def _left_by_my_crash(self, holder: dict[str, Any]) -> bool:
        pid = holder.get("pid")
        return (holder.get("host") == self.mine["host"] and bool(self.mine["boot"])
                and holder.get("boot") == self.mine["boot"]
                and holder.get("db_path") == self.mine["db_path"]
                and isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid))

    @property
    def _kv(self) -> KeyValue:
        assert self.kv is not None, "the bucket is opened first (start)"
        return self.kv

    async def _open(self) -> None:
        if self.kv is not None:
            return
        kv = await open_bucket(self.js, self.bucket, self.ttl_ms, self.op_timeout,
                               replicas=self.replicas)
        ttl = await bucket_ttl(self.js, self.bucket, self.op_timeout)
        if ttl:  # a bucket created by a node with a shorter TTL: renew often enough for it
            self.heartbeat = min(self.heartbeat, heartbeat_seconds(int(ttl * 1000)))
            self.mine["heartbeat"] = self.heartbeat
        self.kv = kv

    async def start(self) -> None:
        """Claim the id at start: raise NodeIdInUse when a live process holds it. When the
        bucket does not answer now, the claim is made by ``run`` once it does."""
        try:
            # A bucket that does not answer must not hold the start up for long.
            await asyncio.wait_for(self._open(), 2 * self.op_timeout)
            await self.acquire()
        except NodeIdInUse:
            raise
        except Exception as exc:
            log.warning("cannot claim node_id %d in KV bucket now (claimed once it answers): "
                        "%s", self.node_id, exc or type(exc).__name__)

    async def acquire(self) -> None:
        """Claim the id, or raise NodeIdInUse when a live process holds it."""
        await self._open()
        while True:
            try:
                self.revision = await bounded(self._kv.create(self.key, self._value()),
                                              self.op_timeout)
                return
            except KeyWrongLastSequenceError:
                pass
            try:
                entry = await bounded(self._kv.get(self.key), self.op_timeout)
            except KeyNotFoundError:
                continue  # gone meanwhile (deleted or expired): create again
            holder = parse_value(entry.value)
            if holder.get("instance") == self.mine["instance"]:
                self.revision = entry.revision
                return
            if not self._left_by_my_crash(holder):
                live = await self._live_holder(entry.revision, holder)
                if live is not None:
                    raise NodeIdInUse(self.node_id, self.mine, live)
            try:
                self.revision = await bounded(
                    self._kv.update(self.key, self._value(), last=entry.revision),
                    self.op_timeout)
            except KeyWrongLastSequenceError:
                continue  # renewed or taken just now: look again
            log.info("node_id %d: took over the claim a stopped process left (%s)",
                     self.node_id, describe(holder))
            return

    async def _live_holder(self, revision: int | None,
                           holder: dict[str, Any]) -> dict[str, Any] | None:
        """The process holding the claim when the claim at ``revision`` is renewed (or taken)
        within two of its holder's heartbeats; None when it is left to lapse."""
        beat = holder.get("heartbeat")
        beat = float(beat) if isinstance(beat, int | float) else self.heartbeat
        log.info("node_id %d is claimed by %s; checking whether that node is alive (up to "
                 "%.0f s)", self.node_id, describe(holder), 2 * beat + self.op_timeout)
        deadline = time.monotonic() + 2 * beat + self.op_timeout
        while time.monotonic() < deadline:
            await asyncio.sleep(POLL_SECONDS)
            try:
                entry = await bounded(self._kv.get(self.key), self.op_timeout)
            except KeyNotFoundError:
                return None
            if entry.revision != revision:
                return parse_value(entry.value)
        return None

    async def run(self, stop: asyncio.Event) -> None:
        """Renew the claim every heartbeat until ``stop``; a claim taken by another process
        sets ``taken`` and ``stop``."""
        failing: str | None = None
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), self.heartbeat)
            if stop.is_set():
                return
            try:
                await self._renew()
            except NodeIdInUse as exc:
                log.error("%s; stopping", exc)
                self.taken = exc
                stop.set()
                return
            except Exception as exc:  # NATS away: the claim is renewed when it is back
                if str(exc) != failing:
                    log.warning("cannot renew the claim on node_id %d (retrying): %s",
                                self.node_id, exc or type(exc).__name__)
                failing = str(exc)
                continue
            failing = None

    async def _renew(self) -> None:
        if self.revision is None:
            await self.acquire()
            return
        try:
            self.revision = await bounded(
                self._kv.update(self.key, self._value(), last=self.revision), self.op_timeout)
            return
        except KeyWrongLastSequenceError:
            pass
        try:
            entry = await bounded(self._kv.get(self.key), self.op_timeout)
        except KeyNotFoundError:  # expired while NATS was away: claim it again
            self.revision = None
            await self.acquire()
            return
        holder = parse_value(entry.value)
        if holder.get("instance") != self.mine["instance"]:
            raise NodeIdInUse(self.node_id, self.mine, holder)
        self.revision = entry.revision

    async def release(self) -> None:
        if self.revision is None or self.taken is not None:
            return
        try:
            await bounded(self._kv.delete(self.key, last=self.revision), self.op_timeout)
        except Exception as exc:  # it expires with the bucket's TTL
            log.debug("releasing the claim on node_id %d: %s", self.node_id, exc)
