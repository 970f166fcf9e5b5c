"""Where a point-in-time restore stops on each stream, and which transactions it leaves out
(pure: no I/O).

Each stream is cut after its last message whose server time is at or before T (for
``--to-sequence STREAM:SEQ``, that stream at SEQ and the others at the time of SEQ). A cut can
fall inside a publish batch (one origin's transaction, or several committed together): part of
its messages before T on one stream, the rest after T on that stream or on another. Such a
batch is left out whole, and so is every later batch of its origin, since a node publishes its
batches one after the other.

A batch's messages say what is needed (see :mod:`harmonylite.replication.event`): the batch
(``Harmonylite-Batch``), whether more of it follows on this stream (``Harmonylite-More``) and,
on each message that ends it on a stream, every shard it wrote to (``Harmonylite-Shards``). A
batch is whole when a message ending it is in hand for each of those shards. Messages of an
older version lack the batch headers: for them only the stream's own framing is known, and a
run of "more follows" messages at the end of a stream's cut is left out.

Only the *tail* is judged: messages within ``TAIL_SECONDS`` before T. A batch whose messages
are older than that and still unfinished was cut off by its node stopping mid-publish; the live
nodes applied it as far as it came (after waiting 10 s), and so does the restore.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from harmonylite.archive.segment import Message
from harmonylite.replication.event import (
    BATCH_HEADER,
    MORE_HEADER,
    ORIGIN_HEADER,
    SHARDS_HEADER,
)

TAIL_SECONDS = 60.0
TAIL_US = int(TAIL_SECONDS * 1_000_000)


def cut_at(messages: Iterable[Message], t_us: int, before: int) -> int:
    """The last sequence of a stream's prefix (from after ``before``) whose times are all at or
    before ``t_us``; ``before`` when the first is already later."""
    last = before
    for m in messages:
        if m.seq <= before:
            continue
        if m.time_us > t_us:
            break
        last = m.seq
    return last


@dataclass
class Decision:
    kept: dict[str, list[Message]] = field(default_factory=dict)
    left_out: dict[str, list[Message]] = field(default_factory=dict)
    # Batches left out of which the snapshot already holds a part (nothing can take it back).
    in_snapshot: list[str] = field(default_factory=list)

    @property
    def left_out_count(self) -> int:
        return sum(len(v) for v in self.left_out.values())


def _batch(m: Message) -> tuple[str, int] | None:
    origin = m.headers.get(ORIGIN_HEADER, "")
    raw = m.headers.get(BATCH_HEADER, "")
    if not origin or not raw.isdigit():
        return None
    return origin, int(raw)


def _more(m: Message) -> bool:
    return m.headers.get(MORE_HEADER) == "1"


class _Ends:
    """Per batch: the streams a message ending it is in hand for, and the streams it declares."""

    def __init__(self, by_stream: Iterable[tuple[str, list[Message]]],
                 stream_of_shard: dict[int, str]) -> None:
        self.finals: dict[tuple[str, int], set[str]] = {}
        self.declared: dict[tuple[str, int], set[str]] = {}
        for stream, msgs in by_stream:
            for m in msgs:
                key = _batch(m)
                if key is None or _more(m):
                    continue
                self.finals.setdefault(key, set()).add(stream)
                shards = m.headers.get(SHARDS_HEADER, "")
                names = {stream_of_shard.get(int(n), f"shard {n}")
                         for n in shards.split(",") if n.isdigit()}
                if names:
                    self.declared.setdefault(key, set()).update(names)

    def whole(self, key: tuple[str, int]) -> bool:
        want = self.declared.get(key)
        return bool(want) and want is not None and want <= self.finals.get(key, set())


def holds_through(messages: dict[str, list[Message]], origins: set[str], upto: int,
                  stream_of_shard: dict[int, str]) -> bool:
    """Whether ``messages`` (per stream) hold, whole, the batch of ``origins`` that carries
    change id ``upto``: the first of their batches ending at or after it (a node publishes its
    batches one after the other, so every earlier one is in hand too)."""
    ends = [key for msgs in messages.values() for m in msgs
            if (key := _batch(m)) is not None and key[0] in origins and key[1] >= upto]
    if not ends:
        return False
    return _Ends(messages.items(), stream_of_shard).whole(min(ends, key=lambda k: k[1]))


def whole_transactions(tails: dict[str, list[Message]], known: dict[str, list[Message]],
                       stream_of_shard: dict[int, str]) -> Decision:
    """Split the ``tails`` (per stream, the messages to apply within the tail, in order) into
    what is kept and what is left out. ``known`` holds, per stream, tail messages the snapshot
    already contains: they count as present but are not applied again."""
    whole = _Ends([*known.items(), *tails.items()], stream_of_shard).whole

    # The first unfinished batch of each origin: it and every later one are left out (and a
    # snapshot that holds part of one cannot serve: ``in_snapshot``).
    stop: dict[str, int] = {}
    for msgs in [*known.values(), *tails.values()]:
        for m in msgs:
            key = _batch(m)
            if key is not None and not whole(key):
                stop[key[0]] = min(stop.get(key[0], key[1]), key[1])
    out = Decision()
    for stream, msgs in tails.items():
        legacy_cut = _legacy_trailing(msgs)
        kept: list[Message] = []
        dropped: list[Message] = []
        for i, m in enumerate(msgs):
            key = _batch(m)
            drop = (key[0] in stop and key[1] >= stop[key[0]]) if key is not None \
                else i in legacy_cut
            (dropped if drop else kept).append(m)
        out.kept[stream] = kept
        if dropped:
            out.left_out[stream] = dropped
    for stream, msgs in known.items():
        for m in msgs:
            key = _batch(m)
            if key is not None and key[0] in stop and key[1] >= stop[key[0]]:
                out.in_snapshot.append(f"origin {key[0]} batch {key[1]} ({stream} {m.seq})")
    return out


def _legacy_trailing(msgs: list[Message]) -> set[int]:
    """Indexes of messages without batch headers that belong to a batch still open at the end
    of the stream's cut: per origin, the "more follows" run after its last ending message."""
    open_from: dict[str, int] = {}
    for i, m in enumerate(msgs):
        if _batch(m) is not None:
            continue
        origin = m.headers.get(ORIGIN_HEADER, "")
        if not origin:
            continue
        if _more(m):
            open_from.setdefault(origin, i)
        else:
            open_from.pop(origin, None)
    out: set[int] = set()
    for origin, start in open_from.items():
        out |= {i for i in range(start, len(msgs))
                if msgs[i].headers.get(ORIGIN_HEADER, "") == origin and _batch(msgs[i]) is None}
    return out
