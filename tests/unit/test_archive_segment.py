"""The archive's segment format and catalog, without a store."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from harmonylite.archive import catalog, cut, segment
from harmonylite.archive.segment import Message, SegmentError, SegmentManifest, SegmentRef
from harmonylite.snapshot.manifest import Manifest


def msgs(first: int, last: int, t0: int = 1_700_000_000_000_000) -> list[Message]:
    return [Message(s, t0 + s * 1000, {"Harmonylite-Origin": "1:ab"}, bytes([s % 256]) * s)
            for s in range(first, last + 1)]


def test_round_trip_keeps_sequences_times_headers_and_bytes() -> None:
    messages = [*msgs(5, 40), Message(41, 1, {}, b"")]
    stored, manifest = segment.encode("s-1", messages, 7)
    assert manifest.first_seq == 5 and manifest.last_seq == 41 and manifest.count == 37
    back = SegmentManifest.from_json(manifest.ref.manifest_key, manifest.to_json())
    assert back == manifest
    assert segment.decode(back, stored) == messages
    assert len(stored) < sum(len(m.data) for m in messages)  # compressed


def test_key_names_range_and_times() -> None:
    _, manifest = segment.encode("s-1", msgs(1, 3), 1)
    ref = manifest.ref
    assert segment.parse_key(ref.data_key) == (ref, "data")
    assert segment.parse_key(ref.manifest_key) == (ref, "manifest")
    assert ref.data_key.startswith("archive/s-1/00000000000000000001-00000000000000000003-")
    assert segment.parse_key("snapshots/x.json") is None
    assert segment.parse_key("archive/heads/s-1.json") is None


@pytest.mark.parametrize("damage", ["flip", "truncate", "other"])
def test_corruption_is_named(damage: str) -> None:
    stored, manifest = segment.encode("s-1", msgs(1, 50), 1)
    if damage == "flip":
        bad = stored[:20] + bytes([stored[20] ^ 1]) + stored[21:]
    elif damage == "truncate":
        bad = stored[:-3]
    else:
        bad, _ = segment.encode("s-1", msgs(1, 49), 1)
    with pytest.raises(SegmentError) as err:
        segment.decode(manifest, bad)
    assert manifest.ref.data_key in str(err.value)


def test_messages_must_be_contiguous() -> None:
    with pytest.raises(ValueError, match="contiguous"):
        segment.encode("s-1", [*msgs(1, 2), *msgs(4, 4)], 1)


def test_time_conversion_is_exact() -> None:
    when = datetime(2026, 12, 5, 8, 1, 2, 345678, tzinfo=UTC)
    us = segment.datetime_to_us(when)
    assert segment.us_to_rfc3339(us) == "2026-12-05T08:01:02.345678Z"


def ref(first: int, last: int) -> SegmentRef:
    return SegmentRef("s-1", first, last, first * 10, last * 10)


def test_coverage_gaps_and_chains() -> None:
    arch = catalog.StreamArchive("s-1", [ref(1, 10), ref(5, 20), ref(21, 30), ref(40, 50)])
    assert arch.gaps() == [(31, 39)]
    assert arch.covers(0, 30) is None
    assert arch.covers(12, 45) == (31, 39)
    assert [s.first for s in arch.chain(12, 30)] == [5, 21]
    assert arch.last == 50


def manifest(sid: str, seq: int, created: str) -> Manifest:
    return Manifest(id=sid, node_id=1, created_at=created, db_bytes=1, db_sha256="",
                    stored_bytes=1, stored_sha256="", compression="none",
                    sequences={"s-1": seq})


def test_window_starts_at_the_oldest_snapshot_the_archive_continues() -> None:
    new = manifest("p000000000000040-20261205T080000Z-1-00000001", 40, "2026-12-05T08:00:00Z")
    mid = manifest("p000000000000020-20261205T070000Z-1-00000002", 20, "2026-12-05T07:00:00Z")
    old = manifest("p000000000000003-20261205T060000Z-1-00000003", 3, "2026-12-05T06:00:00Z")
    arch = catalog.StreamArchive("s-1", [ref(10, 30), ref(31, 45)])
    win = catalog.window([new, mid, old], {"s-1": arch})
    assert win.start is mid  # old needs 4..9, which is missing
    assert win.end_us == win.start_us  # the archive ends (450 us) before that snapshot
    assert catalog.prunable([new, mid], {"s-1": arch}) == ([], [])
    arch.orphans = [ref(1, 9).data_key, ref(46, 50).data_key]
    assert catalog.prunable([new], {"s-1": arch}) == ([ref(10, 30)], [ref(1, 9).data_key])


def framed(seq: int, origin: str, batch: int, *, more: bool = False, shards: str = "",
           t: int = 0) -> Message:
    headers = {"Harmonylite-Origin": origin, "Harmonylite-Batch": str(batch)}
    if more:
        headers["Harmonylite-More"] = "1"
    if shards:
        headers["Harmonylite-Shards"] = shards
    return Message(seq, t or seq, headers, b"")


def test_a_transaction_cut_across_streams_is_left_out_whole() -> None:
    names = {1: "s-1", 2: "s-2"}
    tails = {
        "s-1": [framed(1, "a", 5, shards="1"), framed(2, "b", 9, shards="1,2"),
                framed(3, "b", 12, shards="1")],
        "s-2": [framed(7, "a", 6, shards="2")],  # b's batch 9 ends on s-2 after the cut
    }
    decision = cut.whole_transactions(tails, {"s-1": [], "s-2": []}, names)
    assert [m.seq for m in decision.kept["s-1"]] == [1]  # b 9 and its later batch 12 left out
    assert [m.seq for m in decision.kept["s-2"]] == [7]
    assert decision.left_out_count == 2 and decision.in_snapshot == []
    # Its end on s-2 in hand: whole.
    tails["s-2"].append(framed(8, "b", 9, shards="1,2"))
    decision = cut.whole_transactions(tails, {"s-1": [], "s-2": []}, names)
    assert decision.left_out_count == 0


def test_a_snapshot_holding_part_of_a_left_out_transaction_is_named() -> None:
    known = {"s-1": [framed(4, "b", 9, shards="1,2")], "s-2": []}
    decision = cut.whole_transactions({"s-1": [], "s-2": []}, known, {1: "s-1", 2: "s-2"})
    assert decision.in_snapshot == ["origin b batch 9 (s-1 4)"]


def test_unframed_messages_of_an_open_batch_at_the_end_are_left_out() -> None:
    def old(seq: int, origin: str, more: bool) -> Message:
        return Message(seq, seq, {"Harmonylite-Origin": origin,
                                  **({"Harmonylite-More": "1"} if more else {})}, b"")
    tails = {"s-1": [old(1, "a", True), old(2, "a", False), old(3, "b", True),
                     old(4, "a", True)]}
    decision = cut.whole_transactions(tails, {}, {1: "s-1"})
    assert [m.seq for m in decision.kept["s-1"]] == [1, 2]
    assert cut.cut_at(tails["s-1"], 2, 0) == 2


def test_with_the_archive_snapshots_stay_for_its_retention() -> None:
    from datetime import timedelta

    from harmonylite.snapshot.manifest import retained

    hours = [manifest(f"p{40 - h:015d}-20261205T{12 - h:02d}0000Z-1-0000000{h}", 40 - h,
                      f"2026-12-05T{12 - h:02d}:00:00Z") for h in range(6)]  # newest first
    horizon = datetime(2026, 12, 5, 9, 30, tzinfo=UTC)
    kept = retained(hours, 2, horizon)
    # 12:00 .. 10:00 are inside the retention, 09:00 is where the history begins.
    assert [m.created_at[11:13] for m in kept] == ["12", "11", "10", "09"]
    assert retained(hours, 2) == hours[:2]
    assert len(retained(hours, 5, horizon + timedelta(hours=5))) == 5


def test_a_snapshot_ahead_of_its_positions_needs_the_batch_holding_its_newest_change() -> None:
    names = {1: "s-1", 2: "s-2"}
    mine = {"1:ab", "1:cd"}
    # The snapshot holds node 1's changes up to id 12: the batch ending at 14 carries it.
    after = {"s-1": [framed(5, "2:ef", 30, shards="1"), framed(6, "1:ab", 14, shards="1,2")],
             "s-2": []}
    assert not cut.holds_through(after, mine, 12, names)  # its part on s-2 is after the cut
    after["s-2"].append(framed(9, "1:ab", 14, shards="1,2"))
    assert cut.holds_through(after, mine, 12, names)
    assert not cut.holds_through(after, mine, 15, names)  # a later change: not published yet
    assert not cut.holds_through(after, {"2:ef"} - mine, 31, names)
    # A batch sent again after a restart, under the earlier epoch, counts the same.
    assert cut.holds_through({"s-1": [framed(3, "1:cd", 20, shards="1")]}, mine, 16, names)


def test_a_manifest_keeps_the_local_changes_it_holds() -> None:
    m = Manifest(id="p000000000000001-20240101T000000Z-1-0123abcd", node_id=1,
                 created_at="2024-01-01T00:00:00Z", db_bytes=1, db_sha256="", stored_bytes=1,
                 stored_sha256="", compression="none", local={"origins": ["1:ab"], "upto": 7})
    assert Manifest.from_json(m.to_json()).local == {"origins": ["1:ab"], "upto": 7}
    assert "local" not in replace(m, local={}).to_dict()  # left out when empty
