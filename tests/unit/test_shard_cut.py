"""The cut of a shard-count change: streams are waited for until applied up to it."""

from __future__ import annotations

from harmonylite.node.settings_change import Cut
from harmonylite.node.shared_settings import Record


def test_a_stream_behind_its_cut_is_waited_for_until_applied_up_to_it() -> None:
    positions = {"s-1": 10, "s-2": 3}
    cut = Cut({"s-1": 10, "s-2": 7, "s-3": 5}, positions)
    # s-3 is not consumed (a retired stream deleted since): never waited for.
    assert cut.waiting_for({"s-1", "s-2"}) == ["s-2 up to 7 (at 3)"]
    assert cut.after("s-1") == 10 and cut.after("s-4") == 0
    positions["s-2"] = 7
    assert cut.waiting_for({"s-1", "s-2"}) == [] and cut.passed


def test_a_stream_that_dropped_what_leads_to_its_cut_is_not_waited_for() -> None:
    gaps: dict[str, tuple[int, int]] = {}
    cut = Cut({"s-1": 50}, {"s-1": 3}, lambda: gaps)
    assert cut.waiting_for({"s-1"})
    gaps["s-1"] = (4, 60)  # reported as a gap; waiting would hold the stream for ever
    assert cut.waiting_for({"s-1"}) == []


def test_the_record_keeps_its_cut() -> None:
    record = Record({"replication_log.shards": 4}, {"s-2": "subj-2"}, {"s-1": 9, "s-2": 4}, 1,
                    1.0)
    again = Record.decode(record.encode(), 3)
    assert again.cut == {"s-1": 9, "s-2": 4} and again.retired == {"s-2": "subj-2"}
    assert Record.decode(b'{"settings": {}}', 1).cut == {}
