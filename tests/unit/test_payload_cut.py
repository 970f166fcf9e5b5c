"""Cutting a shard's changes under the server's payload limit, and the reference format."""

from __future__ import annotations

import os

import pytest

from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.errors import DecodeError
from harmonylite.replication.event import decode, encode
from harmonylite.replication.large_changes import (
    HEADER_ROOM,
    Reference,
    message_limit,
    split_by_size,
)


def sizes(weights: list[int]) -> int:
    return sum(weights)


def test_a_run_that_fits_is_one_message() -> None:
    assert split_by_size([1, 2, 3], sizes, 6) == [[1, 2, 3]]


def test_cut_keeps_order_and_every_part_fits() -> None:
    items = [7, 1, 9, 3, 3, 8, 2, 6, 4, 5] * 5
    parts = split_by_size(items, sizes, 20)
    assert [x for p in parts for x in p] == items
    assert all(sum(p) <= 20 for p in parts)


def test_an_item_over_the_limit_stands_alone_between_the_others() -> None:
    parts = split_by_size([1, 1, 100, 1, 1], sizes, 10)
    assert [x for p in parts for x in p] == [1, 1, 100, 1, 1]
    assert [100] in parts
    assert all(sum(p) <= 10 for p in parts if p != [100])


def test_empty_and_single() -> None:
    assert split_by_size([], sizes, 10) == [[]]
    assert split_by_size([50], sizes, 10) == [[50]]


def test_limit_leaves_room_for_headers() -> None:
    assert message_limit(262144) == 262144 - HEADER_ROOM
    assert message_limit(1024 * 1024) == 1024 * 1024 - HEADER_ROOM
    # A tiny limit still leaves something to publish.
    assert message_limit(1500) == 750


@pytest.mark.parametrize("compress", [True, False])
def test_real_encoded_batch_is_cut_under_a_256k_server(compress: bool) -> None:
    """A 400 KB transaction (incompressible blobs) against max_payload 262144: every message
    fits, and decoding the messages gives back every change in order."""
    shape = TableShape("files", ("id", "body"), ("id",))
    shapes = {"files": shape}
    changes = [Change(i, "files", 1, (i, os.urandom(4000))) for i in range(1, 101)]
    limit = message_limit(262144)

    def size_of(part: list[Change]) -> int:
        return len(encode(1, part, shapes, compress))

    assert size_of(changes) > 262144  # the fixed 512 KiB cut sent this as one message
    parts = split_by_size(changes, size_of, limit)
    assert len(parts) > 1
    assert all(size_of(p) <= limit for p in parts)
    decoded = [rc.values for p in parts for rc in decode(encode(1, p, shapes, compress)).changes]
    assert decoded == [c.values for c in changes]


def test_reference_round_trip_and_garbage() -> None:
    ref = Reference("b", "1-abc", "abc", 600_000, "files", (7, b"\xff"))
    assert Reference.decode(ref.encode()) == ref
    with pytest.raises(DecodeError):
        Reference.decode(b"\x00garbage")
    with pytest.raises(DecodeError):
        Reference.decode(encode(1, [], {}, False))
