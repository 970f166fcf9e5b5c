"""The wire format of a change batch (pure: no I/O).

One NATS message carries the changes of one publish batch that fall in one shard, in
change-log order::

    {"v": 1, "n": node_id, "e": epoch, "t": {table: [columns…]}, "k": {table: [key columns…]},
     "h": {table: schema hash}, "c": [[table, op, [values…]], …], "i": [change id, …]}

``h`` is each table's shape on the sender (see ``cdc.rows.table_hash``), for the schema view.

``e`` (the origin database's epoch) and ``i`` (each change's id in the origin's change log,
increasing) let a receiver ignore a change it already applied, however late it comes again
(DESIGN rule 15); a batch without them is applied as it is.

Text that is not valid UTF-8 (SQLite stores whatever bytes it is given) travels as CBOR tag
``RAW_TEXT_TAG`` around its bytes and comes back as :class:`RawText`, so it is written back
byte-exactly as TEXT.

Two headers frame an origin's transactions: ``Harmonylite-Origin`` (``node_id:epoch``) on every
message, and ``Harmonylite-More: 1`` on each message of a publish batch after which more of that
batch follows on the same stream. A receiver applies a batch's messages in one transaction (see
``consumer``). Both are optional: a message without them is a batch of its own, as a previous
version reads every message. ``Harmonylite-Batch`` (the batch's last change id) on every message
and ``Harmonylite-Shards`` (``1,3``: the shards the batch wrote to) on each message that ends it
on its shard frame a batch across streams; the archive's restore reads them.

CBOR keeps every SQLite value exactly (int64, float, text with NUL, blobs, NULL). With
compression on, the CBOR bytes are zstd frames; decoding recognises the zstd magic number, so a
reader needs no configuration to read either form.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cbor2
import zstandard

from harmonylite.cdc.changelog import Change, TableShape
from harmonylite.db.connection import RawText
from harmonylite.errors import DecodeError
from harmonylite.replication.spool import Payload, Spooled

FORMAT = 1
ORIGIN_HEADER = "Harmonylite-Origin"
MORE_HEADER = "Harmonylite-More"
# Every message of a publish batch names the batch (its last change id), and each message that
# ends the batch on its shard names every shard the batch wrote to: a reader of several streams
# (a point-in-time restore) can tell whether all of a transaction is in hand.
BATCH_HEADER = "Harmonylite-Batch"
SHARDS_HEADER = "Harmonylite-Shards"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_compressor = zstandard.ZstdCompressor(level=1)
_decompressor = zstandard.ZstdDecompressor()
# A decompressed batch larger than this is refused as garbage rather than allocated (a message
# read whole; a spooled one, the large change of a verified object, is read in pieces).
MAX_DECODED = 256 * 1024 * 1024
# A value this large is handed to the writer as it is by ``encode_into`` (cbor2 would copy it).
LARGE_VALUE = 1024 * 1024


RAW_TEXT_TAG = 26984  # an unassigned CBOR tag: "text whose bytes are not valid UTF-8"


def _tag_hook(tag: cbor2.CBORTag, immutable: bool) -> object:
    if tag.tag == RAW_TEXT_TAG and isinstance(tag.value, bytes):
        return RawText(tag.value)
    return tag


def _wrap_raw(values: list[object]) -> list[object]:
    return [cbor2.CBORTag(RAW_TEXT_TAG, bytes(v)) if type(v) is RawText else v for v in values]


def dump_values(values: Iterable[object]) -> list[object]:
    """Values ready for cbor2 (text that is not UTF-8 tagged as such)."""
    out = list(values)
    return _wrap_raw(out) if RawText in map(type, out) else out


def dumps_values(values: Iterable[object]) -> bytes:
    return bytes(cbor2.dumps(dump_values(values)))


def loads_values(data: bytes) -> tuple[object, ...]:
    return tuple(cbor2.loads(data, tag_hook=_tag_hook))


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
    epoch: str = ""
    ids: tuple[int, ...] = ()  # per change, its id in the origin's change log (may be empty)
    # A schema change instead of rows (``replicate_ddl``): {"u": id, "o": objects, "s": stmts}.
    schema: dict[str, Any] | None = None

    @property
    def origin(self) -> str:
        return f"{self.node_id}:{self.epoch}" if self.epoch else ""


def shard_of(table: str, key: Sequence[object], shards: int) -> int:
    """Shard (1-based) of a row: a stable hash of the table name and key values."""
    if shards == 1:
        return 1
    digest = hashlib.blake2b(cbor2.dumps([table, list(key)]), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shards + 1


def _document(node_id: int, changes: Iterable[Change], shapes: dict[str, TableShape],
              epoch: str) -> dict[str, object]:
    cols: dict[str, list[str]] = {}
    keys: dict[str, list[str]] = {}
    body: list[list[object]] = []
    ids: list[int] = []
    hashes: dict[str, str] = {}
    for ch in changes:
        if ch.table not in cols:
            shape = shapes[ch.table]
            cols[ch.table] = list(shape.columns)
            keys[ch.table] = list(shape.pk)
            if shape.schema_hash:
                hashes[ch.table] = shape.schema_hash
        body.append([ch.table, ch.op, dump_values(ch.values)])
        ids.append(ch.id)
    doc: dict[str, object] = {"v": FORMAT, "n": node_id, "t": cols, "k": keys, "c": body}
    if epoch:
        doc["e"] = epoch
        doc["i"] = ids
    if hashes:
        doc["h"] = hashes
    return doc


def encode(
    node_id: int, changes: Iterable[Change], shapes: dict[str, TableShape], compress: bool,
    epoch: str = "",
) -> bytes:
    raw = cbor2.dumps(_document(node_id, changes, shapes, epoch))
    return _compressor.compress(raw) if compress else raw


def encode_schema_change(node_id: int, epoch: str, uid: str, objects: dict[str, Any],
                         stmts: list[str], compress: bool) -> bytes:
    """A schema change as a message: a batch without rows (a reader that does not know ``d``
    applies nothing) carrying the change's id, the objects it touched (definitions before and
    after) and the statements that replay it."""
    doc = {"v": FORMAT, "n": node_id, "e": epoch, "t": {}, "k": {}, "c": [],
           "d": {"u": uid, "o": objects, "s": stmts}}
    raw = cbor2.dumps(doc)
    return _compressor.compress(raw) if compress else raw


def loads_raw(data: bytes) -> object:
    """The CBOR document of a message, whatever its shape (None when it is not CBOR): what a
    dead letter can still tell about a message :func:`decode` refuses."""
    try:
        if data[:4] == ZSTD_MAGIC:
            data = _decompressor.decompress(data, max_output_size=MAX_DECODED)
        return cbor2.loads(data, tag_hook=_tag_hook)
    except Exception:  # garbage: nothing to tell (the dead letter keeps the bytes)
        return None


def raw_size(changes: Iterable[Change]) -> int:
    """Bytes of the text and blob values of ``changes`` (what their encoding is about)."""
    return sum(len(v) for ch in changes for v in ch.values if isinstance(v, bytes | str))


class Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


def encode_into(
    sink: Sink, node_id: int, changes: Iterable[Change],
    shapes: dict[str, TableShape], compress: bool, epoch: str = "",
) -> None:
    """:func:`encode`, written to ``sink`` in pieces: a large value is never copied (the same
    bytes a reader decodes, zstd frames too)."""
    doc = _document(node_id, changes, shapes, epoch)
    if not compress:
        _dump(doc, sink.write)
        return
    writer = _compressor.stream_writer(sink, closefd=False)  # type: ignore[arg-type]
    _dump(doc, writer.write)
    writer.flush(zstandard.FLUSH_FRAME)


def _large(obj: object) -> bool:
    return type(obj) is list or (type(obj) is bytes and len(obj) >= LARGE_VALUE)


def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * width):
            return bytes([major << 5 | info]) + n.to_bytes(width, "big")
    raise ValueError(f"a CBOR length of {n} is too large")


def _dump(obj: object, write: Callable[[bytes], object]) -> None:
    """CBOR of ``obj`` as cbor2 writes it, containers and large blobs written piece by piece."""
    if type(obj) is dict:
        write(_head(5, len(obj)))
        for k, v in obj.items():
            write(cbor2.dumps(k))
            _dump(v, write)
    elif type(obj) is list and any(map(_large, obj)):
        write(_head(4, len(obj)))
        for item in obj:
            _dump(item, write)
    elif type(obj) is bytes and len(obj) >= LARGE_VALUE:
        write(_head(2, len(obj)))
        write(obj)
    else:
        write(cbor2.dumps(obj))


def _load(data: Payload) -> object:
    if isinstance(data, Spooled):
        file = data.reader()
        magic = file.read(4)
        file.seek(0)
        if magic != ZSTD_MAGIC:
            return cbor2.load(file, tag_hook=_tag_hook)
        stream = _decompressor.stream_reader(file, read_across_frames=True, closefd=False)
        return cbor2.load(stream, tag_hook=_tag_hook)
    if data[:4] == ZSTD_MAGIC:
        data = _decompressor.decompress(data, max_output_size=MAX_DECODED)
    return cbor2.loads(data, tag_hook=_tag_hook)


def decode(data: Payload) -> Batch:
    """Parse a message; anything that is not a well-formed batch raises DecodeError."""
    try:
        obj = _load(data)
    except Exception as exc:  # cbor2 and zstandard raise many unrelated types on garbage
        raise DecodeError(f"not a harmonylite change batch: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, dict) or obj.get("v") != FORMAT:
        raise DecodeError("not a harmonylite change batch: missing or unknown format version")
    try:
        node = int(obj["n"])
        columns = {str(t): tuple(str(c) for c in cs) for t, cs in obj["t"].items()}
        keys = {str(t): tuple(str(c) for c in ks) for t, ks in obj["k"].items()}
        for table, cols in columns.items():  # once per table, not per change
            if table not in keys or any(k not in cols for k in keys[table]):
                raise DecodeError(f"change for table {table!r} names no usable key columns")
        widths = {t: len(cs) for t, cs in columns.items()}
        changes = []
        for table, op, values in obj["c"]:
            width = widths.get(table)
            if width is None or op not in (1, 2, 3) or type(values) is not list:
                raise DecodeError(f"malformed change for table {table!r}")
            if len(values) != width:
                raise DecodeError(f"change for {table!r} has {len(values)} values, "
                                  f"expected {width}")
            changes.append(RowChange(table, op, tuple(values)))
        epoch = str(obj.get("e") or "")
        raw_ids = obj.get("i") or ()
        if not all(type(i) is int for i in raw_ids):
            raise DecodeError("malformed change ids")
        ids = tuple(raw_ids)
        if ids and len(ids) != len(changes):
            raise DecodeError(f"batch has {len(ids)} change ids for {len(changes)} changes")
        schema = obj.get("d")
        if schema is not None and not (
                isinstance(schema, dict) and isinstance(schema.get("u"), str)
                and isinstance(schema.get("o"), dict) and isinstance(schema.get("s"), list)
                and all(isinstance(s, str) for s in schema["s"])):
            raise DecodeError("malformed schema change")
    except DecodeError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DecodeError(f"malformed change batch: {type(exc).__name__}: {exc}") from exc
    return Batch(node, columns, keys, changes, epoch, ids, schema)
