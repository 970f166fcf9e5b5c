"""Recovery at start: decide whether this node must restore from a snapshot, and do it.

Called by the node after NATS is connected and the streams exist, before change capture is
installed. A node restores when its database file is missing, when its sequence map is missing
(the seed's way to force a snapshot check), or when a stream no longer holds the messages that
follow its position. Otherwise it replays the streams from its positions.

A restore takes the newest committed snapshot that passes every check (size, SHA-256,
``PRAGMA integrity_check``), falling back to older ones; changes still pending in the database it
replaces are published first (or the restore is refused); the verified file is installed under
SQLite's locking (:mod:`harmonylite.node.install`) with the manifest's positions, and the node
replays from exactly the next message of each stream.

Where a node stands against the streams and the snapshots is :mod:`harmonylite.node.coverage`;
installing a chosen snapshot is :mod:`harmonylite.node.restore_loop`; the operator's in-place
restore is :mod:`harmonylite.node.forced_restore`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from harmonylite.aio import wait_any
from harmonylite.errors import (
    HarmonyliteError,
    SnapshotError,
    StorageError,
    StorageUnavailable,
)
from harmonylite.node import install
from harmonylite.node.coverage import Gap, choose, gaps, need, stream_heads
from harmonylite.node.restore_loop import RestoreRefused, publish_pending, restore_newest
from harmonylite.replication.seqmap import read_seq_map, write_seq_map
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.snapshot.storage import ObjectStore, open_store

if TYPE_CHECKING:
    from harmonylite.node.daemon import Node

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


LIST_PATIENCE = 20.0  # seconds a store answering "unavailable" is retried at start


async def _list_patiently(store: ObjectStore) -> list[Manifest]:
    """List the store; while it says it is unavailable (a JetStream cluster still forming
    answers 503 for seconds), retry quietly for a while before giving up."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LIST_PATIENCE
    while True:
        try:
            return await list_snapshots(store)
        except StorageUnavailable:
            if loop.time() >= deadline:
                raise
            await asyncio.sleep(0.5)  # a pause between tries, not a synchronisation


async def recover(node: Node) -> None:
    """Restore from a snapshot when needed (see the module docstring); else do nothing."""
    cfg = node.cfg
    assert node.js is not None
    db_path, seq_map_path = node.db_path, node.seq_map_path
    db_exists = db_path.exists()
    from_file = await asyncio.to_thread(_read_map, seq_map_path)
    in_db = await asyncio.to_thread(install.applied_positions, db_path) if db_exists else {}
    positions = {**(from_file or {}), **in_db}
    heads = await stream_heads(node.js, cfg.names.streams())
    behind = gaps(positions, heads)
    # Gaps found while running: the positions moved past them, so only the record tells.
    recorded = await asyncio.to_thread(install.recorded_gaps, db_path) if db_exists else {}
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
        return
    log.info("checking for a snapshot: %s", "; ".join(reasons))
    diverged = db_exists and bool(behind or recorded)
    # Never go backwards: a snapshot behind what this database already holds would lose rows.
    floor = positions if db_exists else {}
    store = await open_store(cfg.snapshot, js=node.js, bucket=cfg.names.snapshot_bucket)
    try:
        try:
            candidates = await _list_patiently(store)
        except StorageError as exc:
            if not db_exists:
                raise SnapshotError(f"cannot provision {db_path}: the snapshot store cannot be "
                                    f"listed: {exc}") from exc
            log.error("cannot list snapshots (%s); replaying from this node's positions", exc)
            _log_gaps(behind, "no snapshot could be checked")
            return
        choice = choose(candidates, floor, heads)
        for m, why in choice.skipped:
            log.warning("skipping snapshot %s: it is behind this node's database (%s)", m.id,
                        why, extra={"snapshot_id": m.id})
        targets = choice.covering
        if not targets and (diverged or not db_exists) and (candidates or gaps({}, heads)):
            targets, heads = await _ask_and_wait(node, store, floor)
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
                return
            if not choice.usable:
                await asyncio.to_thread(_no_snapshot, db_path, seq_map_path, heads)
                return
            targets = choice.usable  # better than an empty database; the gap stays loud

        async def before_install() -> None:
            await _publish_before_restore(node)

        for attempt in range(1, CATCH_UP_TRIES + 1):
            restored = await restore_newest(cfg, store, targets, db_path=db_path,
                                            seq_map_path=seq_map_path,
                                            before_install=before_install,
                                            guard_pending=cfg.publish)
            manifest = restored.manifest
            node.metrics.restored(manifest.id, manifest.created_at)
            # Under heavy writes and a short retention the streams may drop what follows the
            # snapshot while it is downloaded and installed: then it no longer covers this
            # node, and a newer one must (never run on with a gap that could be covered).
            heads = await stream_heads(node.js, cfg.names.streams())
            moved = gaps(manifest.sequences, heads)
            if not moved or attempt == CATCH_UP_TRIES or node.stop_event.is_set():
                break
            log.warning("the streams dropped messages after snapshot %s while it was installed "
                        "(%s); restoring a newer one (try %d of %d)", manifest.id,
                        ", ".join(map(str, moved)), attempt + 1, CATCH_UP_TRIES,
                        extra={"snapshot_id": manifest.id})
            floor = dict(manifest.sequences)
            targets = choose(await list_snapshots(store), floor, heads).covering
            if not targets:
                targets, heads = await _ask_and_wait(node, store, floor)
            if not targets:
                break
    finally:
        await store.aclose()
    node.restored = manifest.id
    _log_gaps(gaps(manifest.sequences, heads), f"snapshot {manifest.id} is older than them")


def _log_uncovered(recorded: dict[str, tuple[int, int]], what: str) -> None:
    _log_gaps([Gap(s, f, la) for s, (f, la) in sorted(recorded.items())], what)


async def _ask_and_wait(node: Node, store: ObjectStore, floor: dict[str, int]
                        ) -> tuple[list[Manifest], dict[str, int]]:
    """No snapshot covers this node: ask the leader for one and wait (snapshot.request_timeout),
    looking at the streams and the store again every second. Returns the covering snapshots
    found (empty when none came) and the streams' heads at the last look."""
    from harmonylite.snapshot import request

    cfg = node.cfg
    assert node.js is not None
    bound = cfg.snapshot.request_timeout / 1000.0
    deadline = time.monotonic() + bound
    heads = await stream_heads(node.js, cfg.names.streams())
    log.warning("no snapshot covers what this node lacks (%s); asked the snapshot leader for "
                "one, waiting up to %.0f s (snapshot.request_timeout)",
                ", ".join(f"{s} up to {q}" for s, q in sorted(need(heads).items())) or "-",
                bound)
    asked = False
    try:
        while True:
            try:
                await request.ask(node.js, cfg.names.lease_bucket, cfg.snapshot.leader_ttl,
                                  cfg.node_id, need(heads))
                asked = True
            except Exception as exc:
                log.warning("cannot ask the leader for a snapshot: %s", exc)
            try:
                found = choose(await list_snapshots(store), floor, heads).covering
            except StorageError as exc:
                log.warning("cannot list snapshots: %s", exc)
                found = []
            if found:
                log.info("snapshot %s covers this node now", found[0].id,
                         extra={"snapshot_id": found[0].id})
                return found, heads
            if time.monotonic() >= deadline or node.stop_event.is_set():
                return [], heads
            # The polling period of an outside resource (the store), not a synchronisation.
            await wait_any(node.stop_event, timeout=1.0)
            heads = await stream_heads(node.js, cfg.names.streams())
    finally:
        if asked:
            try:
                await request.withdraw(node.js, cfg.names.lease_bucket, cfg.snapshot.leader_ttl)
            except Exception as exc:  # it expires with the bucket's TTL anyway
                log.debug("cannot withdraw the snapshot request: %s", exc)


async def _publish_before_restore(node: Node) -> None:
    if not node.db_path.exists():
        return
    pending = await asyncio.to_thread(install.pending_changes, node.db_path)
    if not pending:
        return
    if not node.cfg.publish:
        log.warning("discarding %d local changes captured while publish = false", pending)
        return
    if node.js is None or node.nc is None or not node.nc.is_connected:
        raise RestoreRefused(pending, "NATS is unreachable")
    await publish_pending(node.cfg, node.js, node.db_path, pending)


def _no_snapshot(db_path: Path, seq_map_path: Path, heads: dict[str, int]) -> None:
    log.warning("no snapshot in the store: starting with an empty database %s and replaying the "
                "streams from sequence 1", db_path)
    install.create_empty(db_path)
    write_seq_map(seq_map_path, {}, durable=True)
    _log_gaps(gaps({}, heads), "no snapshot covers them")
