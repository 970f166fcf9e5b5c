"""``archive verify``: the archive is continuous from the oldest kept snapshot to its head on
every stream, and every segment on that way is sound (its manifest readable, the stored object
of the size and SHA-256 the manifest names, decompressing to exactly its messages)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from harmonylite.archive import catalog, segment
from harmonylite.archive.segment import SegmentError, SegmentManifest
from harmonylite.errors import HarmonyliteError, ObjectNotFound
from harmonylite.snapshot.manifest import list_snapshots
from harmonylite.storage.base import ObjectStore


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)  # what was checked, one line per stream
    problems: list[str] = field(default_factory=list)  # each names a gap or a segment
    segments: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


async def verify(store: ObjectStore, streams: list[str], *, deep: bool = True) -> Report:
    report = Report()
    archives = await catalog.list_archive(store, streams)
    snapshots = await list_snapshots(store)
    if not snapshots:
        report.problems.append("no committed snapshot: the archive has nothing to continue")
        return report
    oldest = snapshots[-1]
    for stream, arch in sorted(archives.items()):
        base = oldest.sequences.get(stream, 0)
        if not arch.segments:
            report.lines.append(f"{stream}: no segment (nothing archived after snapshot "
                                f"{oldest.id}'s position {base})")
            continue
        missing = []
        if arch.first > base + 1:
            missing.append((base + 1, arch.first - 1))
        missing += arch.gaps(since=base)
        for first, last in missing:
            lost = [m.id for m in snapshots if m.sequences.get(stream, 0) < first]
            report.problems.append(
                f"archive gap in {stream}: sequences {first}..{last} are missing; no restore "
                f"from snapshot {lost[-1] if lost else oldest.id} "
                f"{'or newer ones before it ' if len(lost) > 1 else ''}can pass them")
        chain = [r for r in arch.segments if r.last > base]
        if deep:
            for ref in chain:
                problem = await _check(store, ref)
                if problem:
                    report.problems.append(problem)
        report.segments += len(chain)
        report.lines.append(f"{stream}: {len(chain)} segments, sequences "
                            f"{max(base + 1, arch.first)}..{arch.last} after snapshot "
                            f"{oldest.id}" + (f" ({len(arch.orphans)} uncommitted data objects)"
                                              if arch.orphans else ""))
    return report


async def _check(store: ObjectStore, ref: segment.SegmentRef) -> str | None:
    try:
        raw = await store.download_bytes(ref.manifest_key)
        manifest = SegmentManifest.from_json(ref.manifest_key, raw)
        if manifest.ref != ref:
            return f"corrupt segment {ref.manifest_key}: its manifest describes {manifest.ref.stem}"
        data = await store.download_bytes(ref.data_key)
        await asyncio.to_thread(segment.decode, manifest, data)
    except ObjectNotFound as exc:
        return f"missing segment object {exc.key}"
    except SegmentError as exc:
        return f"corrupt segment {exc.key}: {exc.detail}"
    except HarmonyliteError as exc:  # the store, or a sealed object that does not open
        return f"corrupt segment {ref.data_key}: {exc}"
    return None
