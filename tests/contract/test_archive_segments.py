"""Archive segments round-trip through every store, through the one storage protocol."""

from __future__ import annotations

from harmonylite.archive import catalog, segment
from harmonylite.archive.segment import Message
from harmonylite.storage import ObjectStore


async def test_segments_round_trip_and_list(store: ObjectStore) -> None:
    stream = "harmonylite-changes-c-1"
    written = []
    for first in (1, 101):
        messages = [Message(s, 1_700_000_000_000_000 + s, {"Harmonylite-Origin": "3:e"},
                            b"\x00payload" * (s % 7)) for s in range(first, first + 100)]
        data, manifest = segment.encode(stream, messages, 3)
        await store.upload_bytes(manifest.ref.data_key, data)
        await store.upload_bytes(manifest.ref.manifest_key, manifest.to_json())
        written.append((manifest, messages))
    # A data object without its manifest is no segment.
    orphan, orphan_manifest = segment.encode(stream, [Message(201, 1, {}, b"x")], 3)
    await store.upload_bytes(orphan_manifest.ref.data_key, orphan)
    await store.upload_bytes(catalog.head_key(stream),
                             catalog.Head(stream, 200, 1_800_000_000_000_000).to_json())

    archives = await catalog.list_archive(store, [stream])
    arch = archives[stream]
    assert [(s.first, s.last) for s in arch.segments] == [(1, 100), (101, 200)]
    assert arch.orphans == [orphan_manifest.ref.data_key]
    assert arch.head is not None and arch.head.archived == 200
    assert arch.gaps() == []
    for manifest, messages in written:
        raw = await store.download_bytes(manifest.ref.manifest_key)
        back = segment.SegmentManifest.from_json(manifest.ref.manifest_key, raw)
        assert segment.decode(back, await store.download_bytes(back.ref.data_key)) == messages
