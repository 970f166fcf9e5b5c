"""A snapshot store in a JetStream Object Store bucket.

Uploads use nats-py's ``put`` with a file object (streamed, large chunks); the object becomes
visible only when its meta message is published, so a put is atomic. Downloads do not use
nats-py's ``get`` (slow flow control, no size check, can hang): a pull consumer with no acks
reads the object's chunk subject ``$O.<bucket>.C.<nuid>`` in batches, writing to the file and
hashing as it goes, every step under a timeout; size, chunk count and digest are then checked
against the object's info. ``list`` reads the meta subjects directly, so an empty bucket is [].
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext, api
from nats.js.object_store import ObjectStore as NatsObjects

from harmonylite.bus.names import obj_chunks_subject, obj_meta_subjects, obj_stream
from harmonylite.bus.streams import ensure_replicas
from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageError, StorageUnavailable

from .base import ObjectInfo

MAX_CHUNK = 1024 * 1024
BATCH = 16  # chunks requested per pull (bounded memory: BATCH * chunk size)
STEP_TIMEOUT = 10.0  # seconds without progress before a download is given up
# A pull answered 503 (no responders: the consumer or the stream leader is not ready, as while a
# cluster re-forms) is asked again, this many times in a row, this far apart.
UNAVAILABLE_RETRIES = 50
UNAVAILABLE_WAIT = 0.2


def _hex_digest(digest: str | None) -> str | None:
    if not digest or "=" not in digest:
        return None
    algo, _, value = digest.partition("=")
    if algo.upper() != "SHA-256":
        return None
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).hex()
    except (ValueError, TypeError):
        return None


def _parse_mtime(text: str | None) -> datetime | None:
    if not text:
        return None
    # Go writes nanoseconds; fromisoformat takes at most microseconds.
    text = re.sub(r"(\.\d{6})\d+", r"\1", text.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


class NatsObjectStore:
    name = "nats"

    def __init__(self, js: JetStreamContext, obj: NatsObjects, bucket: str) -> None:
        self._js = js
        self._obj = obj
        self.bucket = bucket
        self.stream = obj_stream(bucket)

    @classmethod
    async def open(cls, js: JetStreamContext, bucket: str, *,
                   replicas: int = 1) -> NatsObjectStore:
        try:
            try:
                obj = await js.object_store(bucket)
            except nats.js.errors.NotFoundError:
                config = api.ObjectStoreConfig(
                    bucket=bucket, replicas=replicas, description="harmonylite snapshots"
                )
                obj = await js.create_object_store(bucket, config=config)
            else:
                if replicas > 1:  # an older bucket with fewer replicas is reported
                    await ensure_replicas(js, obj_stream(bucket), replicas, False,
                                          f"object store bucket {bucket}")
        except nats.js.errors.InvalidBucketNameError as exc:
            raise StorageUnavailable(f"invalid object store bucket name {bucket!r}") from exc
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, bucket, f"object store bucket {bucket!r}") from exc
        return cls(js, obj, bucket)

    def _info(self, raw: Any) -> ObjectInfo:
        return ObjectInfo(
            raw.name, int(raw.size or 0), _hex_digest(raw.digest), _parse_mtime(raw.mtime)
        )

    async def _get_info(self, key: str) -> Any:
        try:
            raw = await self._obj.get_info(key)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, self.bucket, key) from exc
        if raw.is_link():
            raise StorageUnavailable(f"object {key} in bucket {self.bucket} is a link")
        return raw

    # -- upload -------------------------------------------------------------------------------

    def _chunk_size(self) -> int:
        max_payload = int(getattr(self._js._nc, "max_payload", MAX_CHUNK) or MAX_CHUNK)
        return min(MAX_CHUNK, max_payload)

    async def _put(self, key: str, source: Any) -> ObjectInfo:
        meta = api.ObjectMeta(
            name=key, options=api.ObjectMetaOptions(max_chunk_size=self._chunk_size())
        )
        try:
            raw = await self._obj.put(key, source, meta=meta)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, self.bucket, key) from exc
        return self._info(raw)

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        fh = await asyncio.to_thread(open, path, "rb")
        try:
            return await self._put(key, fh)
        finally:
            await asyncio.to_thread(fh.close)

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return await self._put(key, bytes(data))

    # -- download -----------------------------------------------------------------------------

    async def _stream_chunks(self, key: str, raw: Any, sink: Any) -> str:
        """Feed every chunk of the object to ``sink`` in order; return the sha256 (hex)."""
        digest = hashlib.sha256()
        total = int(raw.chunks or 0)
        if total == 0:
            return digest.hexdigest()
        js, nc = self._js, self._js._nc
        chunk_subject = obj_chunks_subject(self.bucket, raw.nuid)
        consumer = nc._nuid.next().decode()
        config = api.ConsumerConfig(
            name=consumer,
            filter_subject=chunk_subject,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.NONE,
            inactive_threshold=30.0,
            mem_storage=True,
            num_replicas=1,
        )
        await js.add_consumer(self.stream, config=config)
        inbox = nc.new_inbox()
        # Each pull request gets its own reply subject; status messages arrive on it, so a late
        # status of an earlier request is never mistaken for one of the current request. Data
        # messages keep their stream subject and are checked by consumer sequence instead.
        sub = await nc.subscribe(f"{inbox}.*")
        next_subject = f"{js._prefix}.CONSUMER.MSG.NEXT.{self.stream}.{consumer}"
        try:
            received = 0
            request_no = 0
            unavailable = 0
            while received < total:
                want = min(BATCH, total - received)
                request_no += 1
                reply = f"{inbox}.{request_no}"
                # The object is complete, so no_wait: the server answers at once with what it
                # has, and a purged object (replaced or deleted) shows as a 404 right away.
                request = {"batch": want, "no_wait": True}
                await nc.publish(next_subject, json.dumps(request).encode(), reply=reply)
                got = 0
                while got < want:
                    msg = await sub.next_msg(timeout=STEP_TIMEOUT)
                    status = msg.headers.get(api.Header.STATUS) if msg.headers else None
                    if status and msg.subject != reply:
                        continue  # a status left over from an earlier request
                    if status == "100":  # heartbeat / flow control
                        continue
                    if status == "503" and unavailable < UNAVAILABLE_RETRIES:
                        # No responders: the new consumer (or the stream's leader) is not ready
                        # yet, as while a cluster re-forms; nothing was delivered: ask again.
                        unavailable += 1
                        await asyncio.sleep(UNAVAILABLE_WAIT)
                        break
                    if status:
                        # The chunks went away: the object was replaced or deleted meanwhile.
                        await self._get_info(key)
                        raise StorageUnavailable(
                            f"object {key} in bucket {self.bucket} changed during download "
                            f"(status {status})"
                        )
                    if msg.metadata.sequence.consumer != received + 1:
                        raise StorageUnavailable(f"object {key}: chunk out of order")
                    digest.update(msg.data)
                    await sink(msg.data)
                    got += 1
                    received += 1
                    unavailable = 0
        finally:
            try:
                await sub.unsubscribe()
                await asyncio.wait_for(js.delete_consumer(self.stream, consumer), 5)
            except (nats.errors.Error, TimeoutError):
                pass  # the consumer expires by itself (inactive_threshold)
        return digest.hexdigest()

    async def _fetch(self, key: str, sink: Any) -> ObjectInfo:
        raw = await self._get_info(key)
        info = self._info(raw)
        size = 0

        async def counted(data: bytes) -> None:
            nonlocal size
            size += len(data)
            await sink(data)

        try:
            sha = await self._stream_chunks(key, raw, counted)
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, self.bucket, key) from exc
        if size != info.size:
            raise StorageUnavailable(
                f"object {key}: received {size} bytes, its info says {info.size}"
            )
        if info.sha256 is not None and sha != info.sha256:
            raise StorageUnavailable(f"object {key}: SHA-256 mismatch after download")
        return ObjectInfo(key, size, sha, info.modified)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        fh = await asyncio.to_thread(open, path, "wb")

        async def write(data: bytes) -> None:
            await asyncio.to_thread(fh.write, data)

        try:
            return await self._fetch(key, write)
        finally:
            await asyncio.to_thread(fh.close)

    async def download_bytes(self, key: str) -> bytes:
        parts: list[bytes] = []

        async def collect(data: bytes) -> None:
            parts.append(data)

        await self._fetch(key, collect)
        return b"".join(parts)

    # -- metadata -----------------------------------------------------------------------------

    async def stat(self, key: str) -> ObjectInfo:
        return self._info(await self._get_info(key))

    async def list(self, prefix: str) -> list[ObjectInfo]:
        try:
            info = await self._js.stream_info(self.stream,
                                              subjects_filter=obj_meta_subjects(self.bucket))
            subjects = sorted((info.state.subjects or {}).keys())
            out: list[ObjectInfo] = []
            for subject in subjects:
                try:
                    msg = await self._js.get_last_msg(self.stream, subject)
                except nats.js.errors.NotFoundError:
                    continue  # purged meanwhile
                raw = api.ObjectInfo.from_response(json.loads(msg.data or b"{}"))
                if raw.deleted or not raw.name or not raw.name.startswith(prefix):
                    continue
                out.append(self._info(raw))
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, self.bucket, prefix) from exc
        return sorted(out, key=lambda i: i.key)

    async def delete(self, key: str) -> None:
        try:
            await self._obj.delete(key)
        except nats.js.errors.NotFoundError:
            return
        except (nats.errors.Error, TimeoutError) as exc:
            raise _translate(exc, self.bucket, key) from exc

    async def aclose(self) -> None:
        return None


def _translate(exc: BaseException, bucket: str, key: str) -> StorageError:
    if isinstance(exc, nats.js.errors.NotFoundError):
        return ObjectNotFound(key)
    if isinstance(exc, nats.errors.AuthorizationError):
        return StorageAuthError(f"NATS refused access to object store {bucket}: {exc}")
    if isinstance(exc, nats.js.errors.APIError):
        if exc.code in (401, 403):
            return StorageAuthError(f"NATS refused access to object store {bucket}: {exc}")
        return StorageUnavailable(f"object store {bucket}: {key}: {exc}")
    if isinstance(exc, TimeoutError):
        return StorageUnavailable(f"object store {bucket}: timed out on {key} (NATS unreachable?)")
    return StorageUnavailable(f"object store {bucket}: {key}: {type(exc).__name__} {exc}")
