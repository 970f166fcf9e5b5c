"""What a store's archive holds: segments per stream, their coverage and gaps, the heads the
writer last confirmed, and which segments retention may delete. Listing reads keys only (a
segment's key names its range and times); nothing here downloads segment data.

A stream's archive is the union of its committed segments (those whose manifest exists). Two
leaders that overlapped for a moment may have written segments whose ranges overlap: they hold
the same messages (a stream's message never changes), so coverage merges them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime

from harmonylite.archive.segment import PREFIX, SegmentRef, parse_key
from harmonylite.errors import ObjectNotFound
from harmonylite.snapshot.manifest import Manifest
from harmonylite.storage.base import ObjectStore

HEADS_PREFIX = f"{PREFIX}heads/"


def head_key(stream: str) -> str:
    return f"{HEADS_PREFIX}{stream}.json"


@dataclass(frozen=True)
class Head:
    """The writer found the stream's last sequence archived (``archived``) at ``checked_us``
    (the leader's clock): the archive covers the stream up to that time, idle or not."""

    stream: str
    archived: int
    checked_us: int
    node_id: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"stream": self.stream, "archived": self.archived,
                           "checked_us": self.checked_us, "node_id": self.node_id}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Head:
        data = json.loads(raw)
        return cls(str(data["stream"]), int(data["archived"]), int(data["checked_us"]),
                   int(data.get("node_id", 0)))


@dataclass
class StreamArchive:
    stream: str
    segments: list[SegmentRef] = field(default_factory=list)  # committed, by first sequence
    orphans: list[str] = field(default_factory=list)  # data objects without a manifest
    head: Head | None = None

    @property
    def first(self) -> int:
        return self.segments[0].first if self.segments else 0

    @property
    def last(self) -> int:
        return max((s.last for s in self.segments), default=0)

    def gaps(self, since: int = 0) -> list[tuple[int, int]]:
        """Missing ranges between the segments, after sequence ``since`` (inclusive ranges)."""
        out: list[tuple[int, int]] = []
        reach = 0
        for seg in self.segments:
            if reach and seg.first > reach + 1 and seg.first - 1 > since:
                out.append((max(reach + 1, since + 1), seg.first - 1))
            reach = max(reach, seg.last)
        return out

    def covers(self, after: int, upto: int) -> tuple[int, int] | None:
        """The first missing range of ``after+1 .. upto``, or None when all are archived."""
        want = after + 1
        for seg in self.segments:
            if want > upto:
                return None
            if seg.last < want:
                continue
            if seg.first > want:
                return (want, min(seg.first - 1, upto))
            want = seg.last + 1
        return None if want > upto else (want, upto)

    def chain(self, after: int, upto: int) -> list[SegmentRef]:
        """Segments holding ``after+1 .. upto`` (call :meth:`covers` first), fewest first."""
        out: list[SegmentRef] = []
        want = after + 1
        for seg in sorted(self.segments, key=lambda s: (s.first, -s.last)):
            if want > upto:
                break
            if seg.last < want or seg.first > want:
                continue
            out.append(seg)
            want = seg.last + 1
        return out

    def time_at(self, seq: int) -> int | None:
        """The server time of ``seq`` when it ends or starts a segment, else None."""
        for seg in self.segments:
            if seg.last == seq:
                return seg.last_us
            if seg.first == seq:
                return seg.first_us
        return None

    @property
    def end_us(self) -> int:
        """Until when this stream is known archived: its newest message, or later when the
        writer confirmed (head) that nothing followed it."""
        newest = max((s.last_us for s in self.segments if s.last == self.last), default=0)
        if self.head is not None and self.head.archived >= self.last:
            newest = max(newest, self.head.checked_us)
        return newest


async def list_archive(store: ObjectStore, streams: list[str]) -> dict[str, StreamArchive]:
    """Every stream's archive (an empty one for a stream with none), heads included."""
    out = {s: StreamArchive(s) for s in streams}
    data: dict[str, set[tuple[int, int, int, int]]] = {}
    manifests: dict[str, list[SegmentRef]] = {}
    for info in await store.list(PREFIX):
        parsed = parse_key(info.key)
        if parsed is None:
            continue
        ref, kind = parsed
        key = (ref.first, ref.last, ref.first_us, ref.last_us)
        if kind == "data":
            data.setdefault(ref.stream, set()).add(key)
        else:
            manifests.setdefault(ref.stream, []).append(ref)
    for stream, refs in manifests.items():
        arch = out.setdefault(stream, StreamArchive(stream))
        arch.segments = sorted(refs, key=lambda r: (r.first, r.last))
    for stream, keys in data.items():
        committed = {(r.first, r.last, r.first_us, r.last_us) for r in manifests.get(stream, [])}
        arch = out.setdefault(stream, StreamArchive(stream))
        arch.orphans = sorted(SegmentRef(stream, *k).data_key for k in keys - committed)
    for stream, arch in out.items():
        try:
            arch.head = Head.from_json(await store.download_bytes(head_key(stream)))
        except ObjectNotFound:
            arch.head = None
        except (ValueError, KeyError, TypeError):
            arch.head = None  # unreadable: coverage then ends at the newest segment
    return out


def snapshot_time_us(m: Manifest) -> int:
    try:
        when = datetime.fromisoformat(m.created_at.replace("Z", "+00:00"))
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1_000_000)


def covered_from(m: Manifest, archives: dict[str, StreamArchive]) -> str | None:
    """Why the archive does not hold every change after snapshot ``m`` (None: it does)."""
    for stream, arch in sorted(archives.items()):
        missing = arch.covers(m.sequences.get(stream, 0), arch.last)
        if missing is not None:
            return f"{stream} lacks sequences {missing[0]}..{missing[1]}"
    return None


@dataclass(frozen=True)
class Window:
    """From ``start`` (the oldest snapshot the archive continues) to ``end_us``."""

    start: Manifest | None
    end_us: int
    reason: str = ""  # why there is no window, when ``start`` is None

    @property
    def start_us(self) -> int:
        return snapshot_time_us(self.start) if self.start is not None else 0


def window(snapshots: list[Manifest], archives: dict[str, StreamArchive]) -> Window:
    """The restorable window: ``snapshots`` newest first, ``archives`` by stream."""
    ends = [a.end_us for a in archives.values()]
    end_us = min(ends) if ends else 0
    oldest: Manifest | None = None
    why = "no snapshot"
    for m in snapshots:  # newest first: the last covered one is the window's start
        problem = covered_from(m, archives)
        if problem is None:
            oldest = m
        else:
            why = f"the archive does not continue snapshot {m.id}: {problem}"
            break
    if oldest is None:
        return Window(None, end_us, why)
    return Window(oldest, max(end_us, snapshot_time_us(oldest)))


def prunable(snapshots: list[Manifest], archives: dict[str, StreamArchive]
             ) -> tuple[list[SegmentRef], list[str]]:
    """Segments wholly before the oldest kept snapshot (no restore can use them), and data
    objects without a manifest (left by a leader that lost its lease between the two) there."""
    if not snapshots:
        return [], []
    oldest = snapshots[-1]
    out: list[SegmentRef] = []
    orphans: list[str] = []
    for stream, arch in archives.items():
        base = oldest.sequences.get(stream, 0)
        out += [s for s in arch.segments if s.last <= base]
        for key in arch.orphans:
            parsed = parse_key(key)
            if parsed is not None and parsed[0].last <= base:
                orphans.append(key)
    return out, orphans
