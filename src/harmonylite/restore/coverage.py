"""Where a node stands against the streams and the snapshots: the messages a stream no longer
holds after a position (gaps), and which snapshots a node may install (never one behind its own
database) and which of those cover it (inside what every stream still holds)."""

from __future__ import annotations

from dataclasses import dataclass

from harmonylite.snapshot.manifest import Manifest


@dataclass(frozen=True)
class Gap:
    """Messages ``first``..``last`` of ``stream`` are gone from the stream."""

    stream: str
    first: int
    last: int

    def __str__(self) -> str:
        return f"{self.stream} {self.first}..{self.last}"


def gaps(positions: dict[str, int], heads: dict[str, int]) -> list[Gap]:
    """The messages a node at ``positions`` needs that the streams no longer hold."""
    out = []
    for stream, first in sorted(heads.items()):
        pos = positions.get(stream, 0)
        if first > pos + 1:
            out.append(Gap(stream, pos + 1, first - 1))
    return out


def lost(positions: dict[str, int], heads: dict[str, int]) -> int:
    return sum(g.last - g.first + 1 for g in gaps(positions, heads))


@dataclass(frozen=True)
class Choice:
    covering: list[Manifest]  # at or ahead of the database, and inside every stream: usable
    usable: list[Manifest]  # at or ahead of the database (may leave a stream gap)
    skipped: list[tuple[Manifest, str]]  # behind the database: never installed


def choose(candidates: list[Manifest], floor: dict[str, int], heads: dict[str, int]) -> Choice:
    """Split ``candidates`` (newest first) by what installing each would do to this node."""
    usable: list[Manifest] = []
    skipped: list[tuple[Manifest, str]] = []
    for m in candidates:
        behind = sorted((s, m.sequences.get(s, 0), p) for s, p in floor.items()
                        if m.sequences.get(s, 0) < p)
        if behind:
            skipped.append((m, ", ".join(f"{s} at {q} < {p} in this node's database"
                                         for s, q, p in behind)))
        else:
            usable.append(m)
    covering = [m for m in usable if not gaps(m.sequences, heads)]
    return Choice(covering, usable, skipped)


def need(heads: dict[str, int]) -> dict[str, int]:
    """Per stream, the sequence a snapshot must reach to be inside what the stream holds."""
    return {s: first - 1 for s, first in heads.items() if first > 1}
