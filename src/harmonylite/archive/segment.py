"""One segment of a stream's archive (pure: no I/O).

A segment holds contiguous messages of one stream, each with its stream sequence, the server's
time (microseconds since the epoch), its headers (origin, "more follows", batch framing) and its
payload exactly as the stream holds it (a large change stored out of band is resolved first)::

    zstd( CBOR {"v": 1, "stream": name, "m": [[seq, time_us, {header: value}, payload], …]} )

Two objects per segment, in the snapshot store (through its one storage protocol, so whatever
wraps a store, sealing included, wraps segments too)::

    archive/{stream}/{first:020d}-{last:020d}-{first_time_us}-{last_time_us}.seg.zst
    archive/{stream}/{same stem}.json          the manifest, written after the data

The key alone tells the range and times, so listing a store is enough to know coverage; the
manifest (JSON, no row data) carries the checksums: SHA-256 of the stored object and of the
CBOR inside, byte counts and the message count. A data object without its manifest is not a
segment.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import cbor2
import zstandard

from harmonylite import __version__
from harmonylite.errors import HarmonyliteError

FORMAT = 1
PREFIX = "archive/"
DATA_SUFFIX = ".seg.zst"
MANIFEST_SUFFIX = ".json"
SEQ_DIGITS = 20
_STEM = re.compile(r"^(\d{20})-(\d{20})-(\d+)-(\d+)$")
MAX_DECODED = 1024 * 1024 * 1024  # a segment larger than this decompressed is refused
_compressor = zstandard.ZstdCompressor(level=3)


class SegmentError(HarmonyliteError):
    """A segment is missing, corrupt or not what its manifest says; names the key."""

    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        self.detail = detail
        super().__init__(f"archive segment {key}: {detail}")


@dataclass(frozen=True)
class Message:
    seq: int
    time_us: int  # the server's time of the message, microseconds since the epoch
    headers: dict[str, str]
    data: bytes


@dataclass(frozen=True)
class SegmentRef:
    """What a segment's key says: stream, range and times."""

    stream: str
    first: int
    last: int
    first_us: int
    last_us: int

    @property
    def stem(self) -> str:
        return (f"{PREFIX}{self.stream}/{self.first:0{SEQ_DIGITS}d}-"
                f"{self.last:0{SEQ_DIGITS}d}-{self.first_us}-{self.last_us}")

    @property
    def data_key(self) -> str:
        return self.stem + DATA_SUFFIX

    @property
    def manifest_key(self) -> str:
        return self.stem + MANIFEST_SUFFIX

    @property
    def count(self) -> int:
        return self.last - self.first + 1


def stream_prefix(stream: str) -> str:
    return f"{PREFIX}{stream}/"


def parse_key(key: str) -> tuple[SegmentRef, str] | None:
    """(ref, "data" or "manifest") for a segment key, None for any other key."""
    if not key.startswith(PREFIX):
        return None
    rest = key[len(PREFIX):]
    stream, _, name = rest.partition("/")
    if not stream or "/" in name:
        return None
    for suffix, kind in ((DATA_SUFFIX, "data"), (MANIFEST_SUFFIX, "manifest")):
        if name.endswith(suffix):
            m = _STEM.match(name[: -len(suffix)])
            if m is None:
                return None
            first, last, t1, t2 = (int(g) for g in m.groups())
            if first < 1 or last < first:
                return None
            return SegmentRef(stream, first, last, t1, t2), kind
    return None


@dataclass(frozen=True)
class SegmentManifest:
    stream: str
    first_seq: int
    last_seq: int
    first_time: str  # RFC 3339 of the first message's server time
    last_time: str
    count: int
    stored_bytes: int
    stored_sha256: str
    raw_bytes: int
    raw_sha256: str
    node_id: int  # the leader that wrote it
    created_at: str
    compression: str = "zstd"
    version: str = __version__
    format: int = FORMAT
    first_time_us: int = 0
    last_time_us: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> SegmentRef:
        return SegmentRef(self.stream, self.first_seq, self.last_seq, self.first_time_us,
                          self.last_time_us)

    def to_json(self) -> bytes:
        out = asdict(self)
        if not out["extra"]:
            del out["extra"]
        return json.dumps({"format": out.pop("format"), **out}, indent=2).encode() + b"\n"

    @classmethod
    def from_json(cls, key: str, raw: bytes) -> SegmentManifest:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"unknown segment manifest format {data.get('format')!r}")
            return cls(
                stream=str(data["stream"]), first_seq=int(data["first_seq"]),
                last_seq=int(data["last_seq"]), first_time=str(data["first_time"]),
                last_time=str(data["last_time"]), count=int(data["count"]),
                stored_bytes=int(data["stored_bytes"]), stored_sha256=str(data["stored_sha256"]),
                raw_bytes=int(data["raw_bytes"]), raw_sha256=str(data["raw_sha256"]),
                node_id=int(data["node_id"]), created_at=str(data["created_at"]),
                compression=str(data.get("compression", "zstd")),
                version=str(data.get("version", "")), format=int(data["format"]),
                first_time_us=int(data["first_time_us"]), last_time_us=int(data["last_time_us"]),
                extra=dict(data.get("extra") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise SegmentError(key, f"unreadable manifest: {exc}") from exc


def us_to_rfc3339(time_us: int) -> str:
    when = datetime.fromtimestamp(time_us // 1_000_000, UTC)
    when = when.replace(microsecond=time_us % 1_000_000)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def datetime_to_us(when: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def encode(stream: str, messages: list[Message], node_id: int,
           now: datetime | None = None) -> tuple[bytes, SegmentManifest]:
    """The stored bytes of a segment and its manifest. ``messages`` must be contiguous."""
    if not messages:
        raise ValueError("a segment holds at least one message")
    for prev, cur in itertools.pairwise(messages):
        if cur.seq != prev.seq + 1:
            raise ValueError(f"segment messages must be contiguous: {prev.seq} then {cur.seq}")
    raw = cbor2.dumps({"v": FORMAT, "stream": stream,
                       "m": [[m.seq, m.time_us, dict(m.headers), bytes(m.data)]
                             for m in messages]})
    stored = _compressor.compress(raw)
    first, last = messages[0], messages[-1]
    manifest = SegmentManifest(
        stream=stream, first_seq=first.seq, last_seq=last.seq,
        first_time=us_to_rfc3339(first.time_us), last_time=us_to_rfc3339(last.time_us),
        count=len(messages), stored_bytes=len(stored),
        stored_sha256=hashlib.sha256(stored).hexdigest(), raw_bytes=len(raw),
        raw_sha256=hashlib.sha256(raw).hexdigest(), node_id=node_id,
        created_at=(now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        first_time_us=first.time_us, last_time_us=last.time_us)
    return stored, manifest


def decode(manifest: SegmentManifest, stored: bytes) -> list[Message]:
    """The messages of a segment, every check passed; SegmentError naming the failed one."""
    key = manifest.ref.data_key
    if len(stored) != manifest.stored_bytes:
        raise SegmentError(key, f"size: {len(stored)} bytes stored, the manifest says "
                           f"{manifest.stored_bytes}")
    sha = hashlib.sha256(stored).hexdigest()
    if sha != manifest.stored_sha256:
        raise SegmentError(key, f"sha256: stored object has {sha}, the manifest says "
                           f"{manifest.stored_sha256}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=MAX_DECODED)
    except zstandard.ZstdError as exc:
        raise SegmentError(key, f"decompress: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != manifest.raw_sha256:
        raise SegmentError(key, "sha256 of the decompressed content differs from the manifest")
    try:
        doc = cbor2.loads(raw)
        if doc.get("v") != FORMAT or doc.get("stream") != manifest.stream:
            raise ValueError("format or stream differs from the manifest")
        out = [Message(int(seq), int(t), {str(k): str(v) for k, v in dict(h).items()},
                       bytes(data)) for seq, t, h, data in doc["m"]]
    except (KeyError, TypeError, ValueError, AttributeError, cbor2.CBORDecodeError) as exc:
        raise SegmentError(key, f"malformed content: {exc}") from exc
    expected = list(range(manifest.first_seq, manifest.last_seq + 1))
    if [m.seq for m in out] != expected or len(out) != manifest.count:
        raise SegmentError(key, f"holds {len(out)} messages that are not exactly "
                           f"{manifest.first_seq}..{manifest.last_seq}")
    return out
