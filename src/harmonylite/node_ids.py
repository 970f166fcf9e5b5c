"""Node ids are unsigned 64-bit (HarmonyLite's default, a hash of the machine id, is often above
2**63 - 1); SQLite's INTEGER is signed 64-bit and turns larger values into lossy REALs (or
refuses them). Where a node id is stored in a SQLite column it goes in as the signed integer with
the same 64 bits and comes back as the unsigned id; ids below 2**63 are stored unchanged, so rows
written before are read the same way. CBOR and JSON carry the full range as they are.
"""

from __future__ import annotations

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


def to_sqlite(node_id: int | None) -> int | None:
    """The signed 64-bit integer holding ``node_id``'s bits."""
    if node_id is None:
        return None
    return node_id - _U64 if node_id > _I64_MAX else node_id


def from_sqlite(value: object) -> int | None:
    """The node id a :func:`to_sqlite` value stands for (None stays None)."""
    if value is None:
        return None
    number = int(str(value))
    return number + _U64 if number < 0 else number
