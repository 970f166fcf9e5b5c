"""Change messages larger than the NATS server accepts travel out of band, in an Object Store.

The publisher cuts each shard's changes into messages under the server's ``max_payload``
(:func:`split_by_size`). What still does not fit — a single change, a row with a big blob — is
stored whole in the JetStream Object Store bucket ``{stream_prefix}-large-changes`` (see
:mod:`harmonylite.bus.names`), and a small *reference* message takes its place in the same shard,
at the same position in the stream, with the same ``Nats-Msg-Id``::

    header  Harmonylite-Ref: 1
    body    CBOR {"v": 1, "bucket": b, "ref": object name, "sha256": hex, "size": bytes,
                  "table": first change's table, "key": its key}

Every consumer resolves a reference before the message joins its queue (:func:`resolve`): it
fetches the object, checks size and SHA-256, and hands the original payload on, so the applier
only ever sees ordinary batches. A fetch that fails is retried until it succeeds: skipping the
message would lose the change, and applying anything after it would break the stream's order.

Objects are named after the node and the payload's SHA-256, so storing the same payload again
(a batch re-sent after a crash) finds the object already there. Nothing deletes them yet: an
object must outlive every reference to it in the streams (``replication_log.max_entries``
messages per shard) and every node that may still replay those messages. Deleting objects older
than the streams' oldest message is safe; until that is automated the bucket only grows, by the
size of the large changes written.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import cbor2
from nats.js import JetStreamContext

from harmonylite.aio import Backoff
from harmonylite.errors import DecodeError, ObjectNotFound, StorageUnavailable
from harmonylite.replication.spool import Payload, Spooled
from harmonylite.storage.nats_objects import NatsObjectStore

log = logging.getLogger(__name__)

REF_HEADER = "Harmonylite-Ref"
REF_FORMAT = 1
# The server's limit counts headers and payload together, nats-py checks the payload only: keep
# room for the Nats-Msg-Id and Harmonylite-Ref headers and the protocol's header block.
HEADER_ROOM = 1024
# nats-py's own default, for a connection that has not received the server's INFO.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
RETRY_FIRST = 0.1
RETRY_MAX = 5.0

T = TypeVar("T")


def message_limit(max_payload: int) -> int:
    """Largest payload to publish under a server ``max_payload``, headers left room for."""
    return max(max_payload - HEADER_ROOM, max_payload // 2)


def server_limit(js: JetStreamContext) -> int:
    """The payload limit of the server this connection talks to (from its INFO, which nats-py
    refreshes on every reconnect, so a server with another limit is noticed)."""
    nc = getattr(js, "_nc", None)
    return message_limit(int(getattr(nc, "max_payload", 0) or DEFAULT_MAX_PAYLOAD))


def split_by_size(items: list[T], size_of: Callable[[list[T]], int], limit: int) -> list[list[T]]:
    """Cut ``items`` into consecutive runs whose ``size_of`` is at most ``limit``, in order.

    Halving rather than packing greedily: ``size_of`` is an encoding (compressed, with one
    column list per table), so a run's size is not the sum of its items' sizes and has to be
    measured. A single item over the limit is returned alone; the caller carries it out of band.
    The cut depends only on the items and the limit, so a batch re-sent after a crash is cut the
    same way (same message ids) as long as the server's limit is the same.
    """
    if len(items) <= 1 or size_of(items) <= limit:
        return [items]
    mid = len(items) // 2
    return split_by_size(items[:mid], size_of, limit) + split_by_size(items[mid:], size_of, limit)


@dataclass(frozen=True)
class Reference:
    bucket: str
    name: str
    sha256: str
    size: int
    table: str
    key: tuple[object, ...]

    def encode(self) -> bytes:
        return cbor2.dumps({"v": REF_FORMAT, "bucket": self.bucket, "ref": self.name,
                            "sha256": self.sha256, "size": self.size, "table": self.table,
                            "key": list(self.key)})

    @classmethod
    def decode(cls, data: bytes) -> Reference:
        try:
            obj = cbor2.loads(data)
            if not isinstance(obj, dict) or obj.get("v") != REF_FORMAT:
                raise DecodeError("unknown format version")
            return cls(str(obj["bucket"]), str(obj["ref"]), str(obj["sha256"]),
                       int(obj["size"]), str(obj.get("table", "")),
                       tuple(obj.get("key") or ()))
        except DecodeError as exc:
            raise DecodeError(f"not a harmonylite large-change reference: {exc}") from exc
        except Exception as exc:  # cbor2 raises many unrelated types on garbage
            raise DecodeError(f"not a harmonylite large-change reference: "
                              f"{type(exc).__name__}: {exc}") from exc


class LargeChangeStore:
    """The publisher's side: stores oversized payloads, returns the reference to publish."""

    def __init__(self, js: JetStreamContext, bucket: str, replicas: int, node_id: int) -> None:
        self.js = js
        self.bucket = bucket
        self.replicas = replicas
        self.node_id = node_id
        self._store: NatsObjectStore | None = None

    async def put(self, payload: Payload, table: str, key: Sequence[object]) -> Reference:
        """Store ``payload`` (unless an identical object is there already); raises StorageError.
        A spooled payload is uploaded from its file in chunks."""
        if self._store is None:
            # Created on first use: a cluster that never writes a large change has no bucket.
            self._store = await NatsObjectStore.open(self.js, self.bucket, replicas=self.replicas)
        if isinstance(payload, Spooled):
            payload.flush()
            sha = payload.sha256
        else:
            sha = hashlib.sha256(payload).hexdigest()
        ref = Reference(self.bucket, f"{self.node_id}-{sha}", sha, len(payload), table,
                        tuple(key))
        try:
            have = await self._store.stat(ref.name)
            stored = have.size == ref.size and have.sha256 == sha
        except ObjectNotFound:
            stored = False
        if not stored:
            if isinstance(payload, Spooled):
                await self._store.upload(ref.name, payload.path)
            else:
                await self._store.upload_bytes(ref.name, payload)
        return ref


# Buckets opened for reading, per connection (a reconnect keeps the JetStreamContext).
_readers: weakref.WeakKeyDictionary[JetStreamContext, dict[str, NatsObjectStore]] = \
    weakref.WeakKeyDictionary()


async def _reader(js: JetStreamContext, bucket: str) -> NatsObjectStore:
    opened = _readers.setdefault(js, {})
    store = opened.get(bucket)
    if store is None:
        # Open, never create: a missing bucket is a fault to report, not something to paper
        # over with an empty one.
        store = NatsObjectStore(js, await js.object_store(bucket), bucket)
        opened[bucket] = store
    return store


async def _fetch(js: JetStreamContext, ref: Reference, spool: Path | None) -> Payload:
    store = await _reader(js, ref.bucket)
    if spool is None:
        data = await store.download_bytes(ref.name)
        size, sha = len(data), hashlib.sha256(data).hexdigest()
        out: Payload = data
    else:
        # Into a file in chunks (hashed on the way): memory never holds the whole object.
        out = Spooled(spool)
        try:
            info = await store.download(ref.name, out.path)
        except BaseException:
            out.close()
            raise
        size, sha = info.size, info.sha256 or ""
        out.adopt(size, sha)
    if size != ref.size or sha != ref.sha256:
        raise StorageUnavailable(
            f"object {ref.name} in bucket {ref.bucket} is {size} bytes with another "
            f"SHA-256 than its reference ({ref.size} bytes, {ref.sha256})")
    return out


async def resolve(js: JetStreamContext, data: bytes, headers: Mapping[str, str] | None,
                  spool: Path | None = None) -> Payload:
    """The payload a stream message stands for: ``data`` itself, or the object it refers to
    (kept in a file in ``spool``, the database's directory, when given; in memory otherwise).

    Retries a failed fetch with capped backoff for as long as it takes (only cancellation ends
    it), logging when it starts failing and when it recovers. A reference that cannot even be
    parsed is returned as it is: the applier then reports it as an undecodable message.
    """
    if not headers or REF_HEADER not in headers:
        return data
    try:
        ref = Reference.decode(data)
    except DecodeError as exc:
        log.error("%s", exc)
        return data
    backoff = Backoff(RETRY_FIRST, RETRY_MAX)
    failing = False
    while True:
        try:
            body = await _fetch(js, ref, spool)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            _readers.get(js, {}).pop(ref.bucket, None)  # reopen: the bucket may be recreated
            if not failing:
                failing = True
                log.error(
                    "cannot fetch the large change of table %r key %r (object %s in bucket %s, "
                    "%d bytes): %s: %s; this shard waits and retries until it can",
                    ref.table, ref.key, ref.name, ref.bucket, ref.size, type(exc).__name__, exc,
                    extra={"table": ref.table, "bucket": ref.bucket, "object": ref.name})
            else:
                log.debug("large change %s still unavailable: %s", ref.name, exc)
            await backoff.wait()
            continue
        if failing:
            log.info("fetched the large change %s from bucket %s; applying resumes", ref.name,
                     ref.bucket)
        return body


def describe(count: int, table: str, key: Sequence[object], size: int, limit: int) -> str:
    """Words for an oversized message, naming what it holds, its size and the limit."""
    what = (f"the change to table {table!r} key {tuple(key)!r}" if count == 1 else
            f"{count} changes starting with table {table!r} key {tuple(key)!r}")
    verb = "is" if count == 1 else "are"
    return (f"{what} {verb} {size} bytes encoded, over the NATS server's max_payload less "
            f"header room ({limit} bytes)")


__all__ = ["REF_HEADER", "LargeChangeStore", "Reference", "describe",
           "message_limit", "resolve", "server_limit", "split_by_size"]
