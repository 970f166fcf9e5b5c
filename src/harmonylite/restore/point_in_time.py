"""Restoring a database as the cluster had it at a point in time: the newest snapshot at or
before the point, plus the archived changes after it up to the point, applied by the very
applier the nodes run (conflicts, parked changes, duplicates: the live rules).

The point is a time T (RFC 3339) or a stream sequence (``STREAM:SEQ``, which stands for that
message's server time, with that stream cut exactly at SEQ). Each stream is cut at its last
message at or before T; the snapshot chosen is the newest whose positions are at or before
every cut and from which the archive runs without a hole up to the cuts. Unfinished publish
batches at the cut are left out whole (see :mod:`harmonylite.archive.cut`). The result is
sanitized like a snapshot (no harmonylite table or trigger) and passes ``integrity_check``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from harmonylite.archive import catalog, cut, segment
from harmonylite.archive.segment import Message, SegmentManifest, SegmentRef
from harmonylite.db.connection import open_connection
from harmonylite.errors import SnapshotError, UsageError
from harmonylite.replication.apply import Applier
from harmonylite.replication.event import ORIGIN_HEADER
from harmonylite.restore import db_file as install
from harmonylite.restore.verify import fetch
from harmonylite.snapshot import packing
from harmonylite.snapshot.manifest import Manifest, list_snapshots
from harmonylite.snapshot.progress import NullProgress, ProgressSink
from harmonylite.snapshot.sealing import opened
from harmonylite.storage.base import ObjectStore

log = logging.getLogger(__name__)

APPLY_GROUP = 1000  # messages per applying transaction


class PointInTimeError(SnapshotError):
    """No restore to the point asked for is possible; says why and what is possible."""


@dataclass(frozen=True)
class Target:
    t_us: int | None = None
    stream: str = ""
    seq: int = 0

    def describe(self) -> str:
        if self.stream:
            return f"{self.stream}:{self.seq}"
        return segment.us_to_rfc3339(self.t_us or 0)


_SEQ = re.compile(r"^(?P<stream>[A-Za-z0-9_.-]+):(?P<seq>\d+)$")


def parse_time(text: str) -> Target:
    """RFC 3339 (``2026-12-05T08:00:00Z``, an offset, or no zone for UTC)."""
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise UsageError(f"--to-time {text!r}: expected RFC 3339 such as "
                         "2026-12-05T08:00:00Z") from exc
    return Target(t_us=segment.datetime_to_us(when if when.tzinfo else when.replace(tzinfo=UTC)))


def parse_sequence(text: str) -> Target:
    m = _SEQ.match(text.strip())
    if m is None or int(m["seq"]) < 1:
        raise UsageError(f"--to-sequence {text!r}: expected STREAM:SEQ such as "
                         "harmonylite-changes-c-1:1234")
    return Target(stream=m["stream"], seq=int(m["seq"]))


@dataclass
class Plan:
    snapshot: Manifest
    t_us: int
    cuts: dict[str, int]
    archives: dict[str, catalog.StreamArchive]
    streams: list[str]  # in shard order
    decision: cut.Decision  # the tail: what is applied and what is left out


@dataclass
class Outcome:
    snapshot_id: str
    t_us: int
    cuts: dict[str, int]
    messages: int = 0  # archived messages applied
    rows: int = 0  # changes they applied
    left_out: int = 0  # messages of unfinished batches at the cut
    in_snapshot: list[str] = field(default_factory=list)
    positions: dict[str, int] = field(default_factory=dict)
    # What the result carries besides its tables (as a snapshot does): the origins' marks and
    # the parked changes.
    origins: dict[str, dict[str, int]] = field(default_factory=dict)
    parked: list[dict[str, Any]] = field(default_factory=list)


class Segments:
    """Reads (and checks) segments, keeping the last few decoded."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._cache: dict[str, list[Message]] = {}

    async def read(self, ref: SegmentRef) -> list[Message]:
        key = ref.data_key
        if key not in self._cache:
            manifest = SegmentManifest.from_json(
                ref.manifest_key, await self.store.download_bytes(ref.manifest_key))
            data = await self.store.download_bytes(key)
            if len(self._cache) >= 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = await asyncio.to_thread(segment.decode, manifest, data)
        return self._cache[key]


async def _time_of(segments: Segments, arch: catalog.StreamArchive, seq: int) -> int:
    for ref in arch.segments:
        if ref.first <= seq <= ref.last:
            for m in await segments.read(ref):
                if m.seq == seq:
                    return m.time_us
    raise PointInTimeError(f"{arch.stream} sequence {seq} is not in the archive (it holds "
                           f"{arch.first}..{arch.last})")


async def _cut(segments: Segments, arch: catalog.StreamArchive, t_us: int) -> int:
    """The stream's last archived sequence at or before ``t_us``."""
    before = [r for r in arch.segments if r.first_us <= t_us]
    if not before:
        if arch.segments:
            return arch.first - 1
        return arch.head.archived if arch.head is not None else 0
    ref = max(before, key=lambda r: (r.first, r.last))
    if ref.last_us <= t_us:
        return ref.last
    return cut.cut_at(await segments.read(ref), t_us, ref.first - 1)


async def plan(store: ObjectStore, streams: list[str], target: Target,
               segments: Segments) -> Plan:
    archives = await catalog.list_archive(store, streams)
    snapshots = await list_snapshots(store)
    win = catalog.window(snapshots, archives)
    if win.start is None:
        raise PointInTimeError(f"nothing to restore from: {win.reason}")
    t_us = target.t_us
    if target.stream:
        if target.stream not in archives:
            raise UsageError(f"--to-sequence: no stream {target.stream!r}; the cluster's are "
                             + ", ".join(sorted(archives)))
        t_us = await _time_of(segments, archives[target.stream], target.seq)
    assert t_us is not None
    span = (f"the restorable window is {segment.us_to_rfc3339(win.start_us)} to "
            f"{segment.us_to_rfc3339(win.end_us)}")
    if t_us > win.end_us:
        raise PointInTimeError(f"{target.describe()} is after the archive's end: {span}")
    if t_us < win.start_us:
        raise PointInTimeError(f"{target.describe()} is before the oldest snapshot the archive "
                               f"continues: {span}")
    cuts = {s: await _cut(segments, a, t_us) for s, a in archives.items()}
    if target.stream:
        cuts[target.stream] = target.seq
    passed: list[str] = []
    for m in snapshots:  # newest first
        if not all(m.sequences.get(s, 0) <= c for s, c in cuts.items()) or not all(
                archives[s].covers(m.sequences.get(s, 0), c) is None for s, c in cuts.items()):
            continue
        if m.local and not await _holds_local(m, cuts, archives, list(streams), segments):
            # Taken on a node that was writing: it holds that node's changes that reach the
            # streams only after the point (part of a transaction the point leaves out, or
            # rows the messages up to the point would take back): an older one.
            passed.append(f"{m.id} holds changes of node {m.node_id} that its streams carry "
                          "only after that point")
            continue
        decision = await _decide(m, t_us, cuts, archives, list(streams), segments)
        if decision.in_snapshot:
            # The snapshot holds part of a transaction the point leaves out: an older one.
            passed.append(f"{m.id} holds part of {decision.in_snapshot[0]}")
            continue
        return Plan(m, t_us, cuts, archives, list(streams), decision)
    raise PointInTimeError(f"no snapshot at or before {target.describe()} that the archive "
                           f"continues{' (' + '; '.join(passed) + ')' if passed else ''}: "
                           f"{span}")


async def _holds_local(m: Manifest, cuts: dict[str, int],
                      archives: dict[str, catalog.StreamArchive], streams: list[str],
                      segments: Segments) -> bool:
    """Whether the streams up to the cuts carry, whole, the changes of the taking node that
    snapshot ``m`` held beyond its positions (``m.local``)."""
    origins = {str(o) for o in m.local.get("origins", [])}
    after: dict[str, list[Message]] = {}
    for stream, upto in cuts.items():
        pos = m.sequences.get(stream, 0)
        # Their headers only: what tells a batch whole (memory stays small over a long run).
        after[stream] = [Message(msg.seq, msg.time_us, msg.headers, b"")
                         for ref in archives[stream].chain(pos, upto)
                         for msg in await segments.read(ref)
                         if pos < msg.seq <= upto
                         and msg.headers.get(ORIGIN_HEADER, "") in origins]
    return cut.holds_through(after, origins, int(m.local.get("upto", 0)),
                             {n + 1: s for n, s in enumerate(streams)})


async def _decide(m: Manifest, t_us: int, cuts: dict[str, int],
                  archives: dict[str, catalog.StreamArchive], streams: list[str],
                  segments: Segments) -> cut.Decision:
    """Judge the tail (messages within ``cut.TAIL_US`` before the point) from snapshot ``m``:
    on each stream, the messages it already holds (``known``) and those to apply (``tails``)."""
    boundary = t_us - cut.TAIL_US
    tails: dict[str, list[Message]] = {}
    known: dict[str, list[Message]] = {}
    for stream, upto in cuts.items():
        after = m.sequences.get(stream, 0)
        seen: dict[int, Message] = {}  # by sequence: overlapping segments hold the same ones
        for ref in archives[stream].segments:
            if ref.last_us > boundary and ref.first <= upto:
                for msg in await segments.read(ref):
                    if boundary < msg.time_us and msg.seq <= upto:
                        seen[msg.seq] = msg
        ordered = [seen[q] for q in sorted(seen)]
        known[stream] = [msg for msg in ordered if msg.seq <= after]
        tails[stream] = [msg for msg in ordered if msg.seq > after]
    return cut.whole_transactions(tails, known, {n + 1: s for n, s in enumerate(streams)})


async def restore(store: ObjectStore, streams: list[str], target: Target, output: Path, *,
                  work: Path, replicated: Callable[[str], bool] | None = None,
                  replicate_ddl: bool = False,
                  progress: ProgressSink | None = None) -> Outcome:
    """Write the database at ``target`` to ``output`` (which must not exist)."""
    sink = progress or NullProgress()
    segments = Segments(store)
    p = await plan(store, streams, target, segments)
    db = work / "point-in-time.db"
    await fetch(store, p.snapshot, db, work, sink, integrity=False)
    m = p.snapshot
    parked = (await opened(store, m)).parked  # sealed inside the manifest when encrypted
    await asyncio.to_thread(install.prepare, db, m.sequences, None,
                            install.Carried(m.origins, parked), replicated)
    out = Outcome(m.id, p.t_us, p.cuts)
    sink.stage("apply")
    conn = await asyncio.to_thread(open_connection, db)
    try:
        # The nodes' own applier, set as theirs (schema changes too, with replicate_ddl).
        applier = Applier(skip_pending=False, replicated=replicated,
                          replicate_ddl=replicate_ddl)
        await _apply_all(conn, p, segments, out, applier)
        out.positions = {str(s): int(q) for s, q in conn.execute(
            "SELECT stream, seq FROM __harmonylite__seq")}
    finally:
        conn.close()
    sink.stage("integrity_check")
    facts = await asyncio.to_thread(packing.sanitize, db)
    out.origins, out.parked = facts.origins, facts.parked
    problem = await asyncio.to_thread(packing.check_sound, db)
    if problem:
        raise SnapshotError(f"the restored database failed integrity_check: {problem}")
    await asyncio.to_thread(db.replace, output)  # within the work dir: the caller moves it
    return out


async def _apply_all(conn: sqlite3.Connection, p: Plan, segments: Segments, out: Outcome,
                     applier: Applier) -> None:
    """The messages before the tail as they are, then what the tail's judgement kept."""
    boundary = p.t_us - cut.TAIL_US
    for stream, upto in sorted(p.cuts.items()):
        after = p.snapshot.sequences.get(stream, 0)
        group: list[Message] = []
        for ref in p.archives[stream].chain(after, upto):
            for msg in await segments.read(ref):
                if msg.seq <= after or msg.time_us > boundary:
                    continue  # in the snapshot, or in the tail
                if msg.seq > upto:
                    break
                group.append(msg)
                if len(group) >= APPLY_GROUP:
                    await _apply(applier, conn, stream, group, out)
                    group = []
        await _apply(applier, conn, stream, group, out)
    out.left_out = p.decision.left_out_count
    for stream, kept in sorted(p.decision.kept.items()):
        for i in range(0, len(kept), APPLY_GROUP):
            await _apply(applier, conn, stream, kept[i:i + APPLY_GROUP], out)


async def _apply(applier: Applier, conn: sqlite3.Connection, stream: str,
                 group: list[Message], out: Outcome) -> None:
    if not group:
        return
    msgs = [(m.seq, m.data) for m in group]
    result = await asyncio.to_thread(applier.apply, conn, stream, msgs)
    out.messages += result.messages
    out.rows += result.rows
    for seq, reason in result.failed:
        log.warning("%s sequence %d was not applied whole in the restore: %s", stream, seq,
                    reason, extra={"stream": stream, "sequence": seq})
