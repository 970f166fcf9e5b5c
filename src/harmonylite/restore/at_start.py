"""Recovery at start: decide whether this node must restore from a snapshot, and do it.

Called by the node after NATS is connected and the streams exist, before change capture is
installed. A node restores when its database file is missing, when its sequence map is missing
(the seed's way to force a snapshot check), or when a stream no longer holds the messages that
follow its position. Otherwise it replays the streams from its positions.

A restore takes the newest committed snapshot that passes every check (size, SHA-256,
``PRAGMA integrity_check``), falling back to older ones; changes still pending in the database it
replaces are published first (or the restore is refused); the verified file is installed under
SQLite's locking (:mod:`harmonylite.restore.db_file`) with the manifest's positions, and the node
replays from exactly the next message of each stream.

Where a node stands against the streams and the snapshots is :mod:`harmonylite.restore.coverage`;
installing a chosen snapshot is :mod:`harmonylite.restore.loop`; the operator's in-place
restore is :mod:`harmonylite.restore.forced`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client
from nats.js import JetStreamContext

from harmonylite.aio import wait_any
from harmonylite.bus.kv import heartbeat_seconds
from harmonylite.bus.names import namespace
from harmonylite.bus.streams import stream_heads
from harmonylite.config import Config
from harmonylite.errors import (
    HarmonyliteError,
    SnapshotError,
    StorageError,
)
from harmonylite.ops.metrics import Metrics
from harmonylite.replication.read_ahead import ReadAhead, read_ahead, stop_all
from harmonylite.replication.seqmap import read_seq_map, write_seq_map
from harmonylite.restore import db_file, join
from harmonylite.restore.coverage import Gap, choose, gaps, need
from harmonylite.restore.loop import (
    NoSoundSnapshot,
    RestoreRefused,
    list_patiently,
    patiently,
    publish_pending,
    restore_newest,
)
from harmonylite.snapshot import request
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.storage import ObjectStore, open_store

log = logging.getLogger(__name__)

# Restores in a row when the streams keep dropping what follows the snapshot just installed.
CATCH_UP_TRIES = 3


def _read_map(path: Path) -> dict[str, int] | None:
    try:
        return read_seq_map(path)
    except HarmonyliteError as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None


def _log_gaps(found: list[Gap], what: str) -> None:
    for gap in found:
        log.error("messages %d..%d of stream %s are gone from the stream and lost to this node "
                  "(%s); a newer snapshot is needed for it to converge", gap.first, gap.last,
                  gap.stream, what,
                  extra={"stream": gap.stream, "from_seq": gap.first, "to_seq": gap.last})


@dataclass
class Recovery:
    """What the start-up recovery did: the snapshot it restored (if any), and the streams read
    ahead since it began (handed to the consumers, then stopped)."""

    restored: str | None = None
    readers: dict[str, ReadAhead] = field(default_factory=dict)
    joining: join.Joining | None = None  # as the recovery left it (decided against a snapshot)


@dataclass
class StartParts:
    """What the start-up recovery works with, handed over by the node that wires it."""

    cfg: Config
    nc: Client
    js: JetStreamContext
    db_path: Path
    seq_map_path: Path
    stop: asyncio.Event
    metrics: Metrics
    waiting: Callable[[str | None], None]  # why the start waits (health says 503 meanwhile)
    joining: join.Joining | None = None  # a database with rows of its own (join.check)


def _window(heads: dict[str, int], readers: dict[str, ReadAhead]) -> dict[str, int]:
    """Per stream, the first sequence still available: in the stream or in its read-ahead."""
    return {s: min(first, readers[s].first) if s in readers else first
            for s, first in heads.items()}


async def recover(parts: StartParts) -> Recovery:
    """Restore from a snapshot when needed (see the module docstring); else do nothing."""
    cfg = parts.cfg
    db_path, seq_map_path = parts.db_path, parts.seq_map_path
    db_exists = db_path.exists()
    from_file = await asyncio.to_thread(_read_map, seq_map_path)
    in_db = await asyncio.to_thread(db_file.applied_positions, db_path) if db_exists else {}
    positions = {**(from_file or {}), **in_db}
    heads = await stream_heads(parts.js, namespace(cfg).streams())
    behind = gaps(positions, heads)
    # Gaps found while running: the positions moved past them, so only the record tells.
    recorded = await asyncio.to_thread(db_file.recorded_gaps, db_path) if db_exists else {}
    reasons = []
    if recorded:
        reasons.append("the streams dropped messages before this node applied them ("
                       + ", ".join(f"{s} {f}..{la}" for s, (f, la) in sorted(recorded.items()))
                       + ")")
    if not db_exists:
        reasons.append(f"database file {db_path} is missing")
    if from_file is None:
        reasons.append(f"sequence map {seq_map_path} is missing")
    if behind and db_exists:
        reasons.append("the streams no longer hold the messages after this node's position ("
                       + ", ".join(map(str, behind)) + ")")
    if not reasons:
        return Recovery()
    log.info("checking for a snapshot: %s", "; ".join(reasons))
    # From now on every stream is read ahead, so whatever snapshot comes, the messages after it
    # are still at hand however fast the streams roll over.
    subjects = namespace(cfg).subjects()
    starts = {s: max(heads.get(s, 1), positions.get(s, 0) + 1 if db_exists else 1)
              for s in subjects}
    readers = await read_ahead(parts.js, subjects, starts, db_path.parent)
    try:
        restored = await _recover(parts, readers, db_exists, positions, recorded, behind)
    except BaseException:
        await stop_all(readers)
        raise
    finally:
        parts.waiting(None)
    if restored is None:
        await stop_all(readers)
        return Recovery(joining=parts.joining)
    return Recovery(restored, readers, parts.joining)


def _unlisted(db_path: Path, db_exists: bool, behind: list[Gap], what: str,
              exc: StorageError) -> None:
    """The store could not be opened or listed: a new node cannot start; a node with a database
    replays from its own positions, its gaps logged."""
    if not db_exists:
        raise SnapshotError(f"cannot provision {db_path}: the snapshot store cannot be "
                            f"{what}: {exc}") from exc
    log.error("cannot list snapshots (%s); replaying from this node's positions", exc)
    _log_gaps(behind, "no snapshot could be checked")


async def _recover(parts: StartParts, readers: dict[str, ReadAhead], db_exists: bool,
                   positions: dict[str, int], recorded: dict[str, tuple[int, int]],
                   behind: list[Gap]) -> str | None:
    cfg = parts.cfg
    db_path, seq_map_path = parts.db_path, parts.seq_map_path
    diverged = db_exists and bool(behind or recorded)
    # Never go backwards: a snapshot behind what this database already holds would lose rows.
    floor = positions if db_exists else {}
    heads = _window(await stream_heads(parts.js, namespace(cfg).streams()), readers)
    try:
        # A JetStream cluster still forming times out on the object store's bucket for seconds.
        store = await patiently(lambda: open_store(cfg.snapshot, js=parts.js,
                                                   bucket=namespace(cfg).snapshot_bucket))
    except StorageError as exc:
        _unlisted(db_path, db_exists, behind, "opened", exc)
        return None
    try:
        try:
            candidates = await list_patiently(store)
        except StorageError as exc:
            _unlisted(db_path, db_exists, behind, "listed", exc)
            return None
        choice = choose(candidates, floor, heads)
        for m, why in choice.skipped:
            log.warning("skipping snapshot %s: it is behind this node's database (%s)", m.id,
                        why, extra={"snapshot_id": m.id})
        targets = choice.covering
        needed = diverged or not db_exists
        if not targets and needed and (candidates or gaps({}, heads)):
            targets, heads = await _ask_and_wait(parts, store, floor, set(), readers)
        if not targets:
            if db_exists:
                if choice.usable and not diverged:
                    log.warning("not restoring: snapshot %s would leave this node behind what "
                                "the streams hold, and its database is not",
                                choice.usable[0].id, extra={"snapshot_id": choice.usable[0].id})
                elif not candidates:
                    log.warning("no snapshot in the store; replaying the streams from this "
                                "node's positions")
                _log_gaps(gaps(positions, heads), "no snapshot covers them")
                _log_uncovered(recorded, "no snapshot covers them")
                return None
            if not choice.usable:
                await asyncio.to_thread(_no_snapshot, db_path, seq_map_path, heads)
                return None
            targets = choice.usable  # better than an empty database; the gap stays loud

        # A database with rows of its own is replaced only as the operator chose.
        if parts.joining is not None:
            parts.joining = await join.decide(cfg, store, targets, db_path, parts.joining)
        joining = parts.joining

        async def before_install() -> None:
            await _publish_before_restore(parts)
            if joining is not None:
                await join.before_install(joining, db_path)

        unsound: set[str] = set()
        for attempt in range(1, CATCH_UP_TRIES + 1):
            try:
                restored = await restore_newest(cfg, store, targets, db_path=db_path,
                                                seq_map_path=seq_map_path,
                                                before_install=before_install,
                                                guard_pending=cfg.publish)
            except NoSoundSnapshot as exc:
                if not needed:
                    raise
                # Every snapshot that would do failed a check: a fresh one from the leader will.
                unsound.update(m.id for m in targets)
                log.warning("%s; asking the snapshot leader for a fresh one", exc)
                targets, heads = await _ask_and_wait(parts, store, floor, unsound, readers)
                if not targets:
                    raise
                continue
            manifest = restored.manifest
            parts.metrics.restored(manifest.id, manifest.created_at)
            # Without a read-ahead covering it (it may have had to drop its oldest messages),
            # the streams may drop what follows the snapshot while it is downloaded and
            # installed: then a newer one must cover this node (never run on with a gap).
            heads = _window(await stream_heads(parts.js, namespace(cfg).streams()), readers)
            moved = gaps(manifest.sequences, heads)
            if not moved or attempt == CATCH_UP_TRIES or parts.stop.is_set():
                break
            log.warning("the streams dropped messages after snapshot %s while it was installed "
                        "(%s); restoring a newer one (try %d of %d)", manifest.id,
                        ", ".join(map(str, moved)), attempt + 1, CATCH_UP_TRIES,
                        extra={"snapshot_id": manifest.id})
            floor = dict(manifest.sequences)
            targets = choose(await list_snapshots(store), floor, heads).covering
            if not targets:
                targets, heads = await _ask_and_wait(parts, store, floor, unsound, readers)
            if not targets:
                break
        else:
            raise SnapshotError("no sound snapshot could be restored")
    finally:
        await store.aclose()
    _log_gaps(gaps(manifest.sequences, heads), f"snapshot {manifest.id} is older than them")
    return manifest.id


def _log_uncovered(recorded: dict[str, tuple[int, int]], what: str) -> None:
    _log_gaps([Gap(s, f, la) for s, (f, la) in sorted(recorded.items())], what)


def _no_leader_grace(cfg: Config) -> float:
    """How long a node waits, once it found no node holding the snapshot lease, before giving
    up: an eligible node takes a free lease at once (a deleted lease wakes it, and a node that
    becomes eligible looks every second) or at its next heartbeat when the lease expired."""
    return min(heartbeat_seconds(cfg.snapshot.leader_ttl), 10.0) + 5.0


async def _ask_and_wait(parts: StartParts, store: ObjectStore, floor: dict[str, int],
                        exclude: set[str], readers: dict[str, ReadAhead]
                        ) -> tuple[list[Manifest], dict[str, int]]:
    """No sound snapshot covers this node: ask the leader for one and wait, looking at the
    streams and the store again every second, for as long as some node holds the snapshot
    lease (saying so every ``snapshot.request_timeout``). When no node holds it for longer than
    a lease's TTL, no snapshot can come: give up. Returns the covering snapshots found (empty
    when none came) and the first sequences still available at the last look."""
    cfg = parts.cfg
    streams = namespace(cfg).streams()
    remind = max(1.0, cfg.snapshot.request_timeout / 1000.0)
    started = time.monotonic()
    next_reminder = started + remind
    heads = _window(await stream_heads(parts.js, streams), readers)
    wanted = ", ".join(f"{s} up to {q}" for s, q in sorted(need(heads).items())) or "-"
    waiting_for = f"waiting for a snapshot that covers this node ({wanted})"
    parts.waiting(waiting_for)
    log.warning("no sound snapshot covers what this node lacks (%s); asked the snapshot leader "
                "for one", wanted)
    asked = False
    no_leader_since: float | None = None
    try:
        while True:
            try:
                await request.ask(parts.js, namespace(cfg).lease_bucket, cfg.snapshot.leader_ttl,
                                  cfg.node_id, need(heads), exclude)
                asked = True
            except Exception as exc:
                log.warning("cannot ask the leader for a snapshot: %s", exc)
            try:
                listed = await list_snapshots(store)
                found = [m for m in choose(listed, floor, heads).covering if m.id not in exclude]
            except StorageError as exc:
                log.warning("cannot list snapshots: %s", exc)
                found = []
            if found:
                log.info("snapshot %s covers this node now", found[0].id,
                         extra={"snapshot_id": found[0].id})
                return found, heads
            now = time.monotonic()
            try:
                leader = await request.holder(parts.js, namespace(cfg).lease_bucket,
                                              cfg.snapshot.leader_ttl)
            except Exception as exc:
                log.debug("cannot read the snapshot lease: %s", exc)
                leader = -1  # unknown: keep waiting
            if leader is None:
                if no_leader_since is None:
                    no_leader_since = now
                    log.warning("no node holds the snapshot lease: no snapshot can be taken "
                                "until a node with publish, replicate and snapshots on, in "
                                "step with the streams, takes it; waiting %.0f s for one",
                                _no_leader_grace(cfg))
                    parts.waiting("no node can take snapshots: " + waiting_for)
                elif now - no_leader_since >= _no_leader_grace(cfg):
                    log.error("no node took the snapshot lease in %.0f s: starting without the "
                              "snapshot this node needs", now - no_leader_since)
                    return [], heads
            elif no_leader_since is not None:
                no_leader_since = None
                parts.waiting(waiting_for)
                if leader > 0:
                    log.info("node %d holds the snapshot lease now", leader)
            if now >= next_reminder:
                log.warning("still waiting for a snapshot that covers this node (%s) after "
                            "%.0f s", wanted, now - started)
                next_reminder = now + remind
            if parts.stop.is_set():
                return [], heads
            # The polling period of an outside resource (the store), not a synchronisation.
            await wait_any(parts.stop, timeout=1.0)
            heads = _window(await stream_heads(parts.js, streams), readers)
    finally:
        if asked:
            try:
                await request.withdraw(parts.js, namespace(cfg).lease_bucket,
                                       cfg.snapshot.leader_ttl)
            except Exception as exc:  # it expires with the bucket's TTL anyway
                log.debug("cannot withdraw the snapshot request: %s", exc)


async def _publish_before_restore(parts: StartParts) -> None:
    if not parts.db_path.exists():
        return
    pending = await asyncio.to_thread(db_file.pending_changes, parts.db_path)
    if not pending:
        return
    if not parts.cfg.publish:
        log.warning("discarding %d local changes captured while publish = false", pending)
        return
    if not parts.nc.is_connected:
        raise RestoreRefused(pending, "NATS is unreachable")
    await publish_pending(parts.cfg, parts.js, parts.db_path, pending)


def _no_snapshot(db_path: Path, seq_map_path: Path, heads: dict[str, int]) -> None:
    log.warning("no snapshot in the store: starting with an empty database %s and replaying the "
                "streams from sequence 1", db_path)
    db_file.create_empty(db_path)
    write_seq_map(seq_map_path, {}, durable=True)
    _log_gaps(gaps({}, heads), "no snapshot covers them")
