"""The wire format of a change batch (pure: no I/O).

One NATS message carries the changes of one publish batch that fall in one shard, in
change-log order::

    {"v": 1, "n": node_id, "t": {table: [columns…]}, "k": {table: [key columns…]},
     "c": [[table, op, [values…]], …]}

CBOR keeps every SQLite value exactly (int64, float, text with NUL, blobs, NULL). With
compression on, the CBOR bytes are zstd frames; decoding recognises the zstd magic number, so a
reader needs no configuration to read either form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cbor2
import zstandard

from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.errors import DecodeError

FORMAT = 1
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()
# A decompressed batch larger than this is refused as garbage rather than allocated.
MAX_DECODED = 256 * 1024 * 1024


@dataclass(frozen=True)
class RowChange:
    table: str
    op: int
    values: tuple[object, ...]


@dataclass(frozen=True)
class Batch:
    node_id: int
    columns: dict[str, tuple[str, ...]]
    keys: dict[str, tuple[str, ...]]
    changes: list[RowChange]


def shard_of(table: str, key: Sequence[object], shards: int) -> int:
    """Shard (1-based) of a row: a stable hash of the table name and key values."""
    if shards == 1:
        return 1
    digest = hashlib.blake2b(cbor2.dumps([table, list(key)]), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards + 1


def encode(
    node_id: int, changes: Iterable[Change], shapes: dict[str, TableShape], compress: bool
) -> bytes:
    cols: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    body: list[list[object]] = []
    for ch in changes:
        if ch.table not in cols:
            shape = shapes[ch.table]
            cols[ch.table] = list(shape.columns)
            keys[ch.table] = list(shape.pk)
        body.append([ch.table, ch.op, list(ch.values)])
    raw = cbor2.dumps({"v": FORMAT, "n": node_id, "t": cols, "k": keys, "c": body})
    return _compressor.compress(raw) if compress else raw


def decode(data: bytes) -> Batch:
    """Parse a message; anything that is not a well-formed batch raises DecodeError."""
    try:
        if data[:4] == ZSTD_MAGIC:
            data = _decompressor.decompress(data, max_output_size=MAX_DECODED)
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 and zstandard raise many unrelated types on garbage
        raise DecodeError(f"not a harmonylite change batch: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != FORMAT:
        raise DecodeError("not a harmonylite change batch: missing or unknown format version")
    try:
        node = int(obj["n"])
        columns = {str(t): tuple(str(c) for c in cs) for t, cs in obj["t"].items()}
        keys = {str(t): tuple(str(c) for c in ks) for t, ks in obj["k"].items()}
        changes = []
        for table, op, values in obj["c"]:
            if table not in columns or op not in (1, 2, 3) or not isinstance(values, list):
                raise DecodeError(f"malformed change for table {table!r}")
            if len(values) != len(columns[table]):
                raise DecodeError(f"change for {table!r} has {len(values)} values, "
                                  f"expected {len(columns[table])}")
            changes.append(RowChange(str(table), int(op), tuple(values)))
    except DecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc
    return Batch(node, columns, keys, changes)
