"""A snapshot store in an S3 bucket (AWS, MinIO, SeaweedFS, ...).

boto3 is blocking, so every call runs in a worker thread. Uploads and downloads go through the
transfer manager (``upload_file``/``download_file``), which switches to multipart for large files;
an S3 PUT or a completed multipart upload is atomic. ``open_stream`` reads an object as ranged
GETs, several in flight, for a restore that works on the bytes as they arrive. The SHA-256 of
the data is stored as the object metadata ``sha256`` so that ``stat`` can report it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import boto3
import s3transfer.exceptions
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    PartialCredentialsError,
)

from harmonylite.config import S3Config
from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageError, StorageUnavailable
from harmonylite.redact import redact

from .base import ObjectInfo
from .streaming import PART_BYTES, ObjectStream, PartStream

_T = TypeVar("_T")
log = logging.getLogger(__name__)
_SDK_ERRORS = (
    ClientError, BotoCoreError, Boto3Error, s3transfer.exceptions.RetriesExceededError,
    s3transfer.exceptions.S3UploadFailedError, s3transfer.exceptions.S3DownloadFailedError,
)
CHUNK = 1024 * 1024
META_SHA256 = "sha256"
_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
_AUTH = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "InvalidClientTokenId", "AuthorizationHeaderMalformed", "AllAccessDisabled",
}


def endpoint_url(endpoint: str, use_ssl: bool) -> str | None:
    """``minio:9000`` -> ``http(s)://minio:9000``; a URL with a scheme is kept as it is."""
    if not endpoint:
        return None
    if "://" in endpoint:
        return endpoint.rstrip("/")
    return f"{'https' if use_ssl else 'http'}://{endpoint.rstrip('/')}"


def _sha256_file(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb") as fh:
        while n := fh.readinto(buf):
            digest.update(view[:n])
            size += n
    return digest.hexdigest(), size


class S3Store:
    name = "s3"

    def __init__(self, cfg: S3Config, *, max_attempts: int = 3) -> None:
        if not cfg.bucket:
            raise ValueError("snapshot.s3.bucket is empty")
        self.bucket = cfg.bucket
        self.prefix = cfg.path.strip("/")
        self.endpoint = endpoint_url(cfg.endpoint, cfg.use_ssl)
        self._secrets = [s for s in (cfg.secret, cfg.session_token) if s]
        self._read_attempts = max_attempts
        self.part_bytes = PART_BYTES  # of a streamed read (open_stream)
        boto_cfg = BotoConfig(
            region_name=cfg.region or None,
            s3={"addressing_style": "path" if cfg.force_path_style else "auto"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        session = boto3.session.Session(
            aws_access_key_id=cfg.access_key or None,
            aws_secret_access_key=(cfg.secret or None) if cfg.access_key else None,
            aws_session_token=(cfg.session_token or None) if cfg.access_key else None,
            region_name=cfg.region or None,
        )
        self._client: Any = session.client(
            "s3", endpoint_url=self.endpoint, use_ssl=cfg.use_ssl, config=boto_cfg
        )
        self._transfer = TransferConfig(
            multipart_threshold=64 * 1024 * 1024,
            multipart_chunksize=16 * 1024 * 1024,
            max_concurrency=4,
        )

    @classmethod
    async def open(cls, cfg: S3Config) -> S3Store:
        store = await asyncio.to_thread(cls, cfg)
        await asyncio.to_thread(store._ensure_bucket)
        return store

    def _ensure_bucket(self) -> None:
        """Create the bucket when it does not exist, as HarmonyLite does; credentials that may
        not create it get an error naming the bucket and the permission. Any other answer is
        left to the first real call, which reports it in context."""
        try:
            if self._bucket_exists():
                return
        except (ClientError, BotoCoreError) as exc:
            log.debug("cannot check S3 bucket %r: %s", self.bucket, self._clean(str(exc)))
            return
        args: dict[str, Any] = {"Bucket": self.bucket}
        region = self._client.meta.region_name
        if region and region != "us-east-1":  # us-east-1 refuses an explicit constraint
            args["CreateBucketConfiguration"] = {"LocationConstraint": region}
        try:
            self._client.create_bucket(**args)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return  # another node created it meanwhile
            if code in _AUTH or status in ("401", "403"):
                raise StorageAuthError(self._clean(
                    f"S3 bucket {self.bucket!r} does not exist and these credentials may not "
                    f"create it (permission s3:CreateBucket: {code or status}); create the "
                    f"bucket or grant s3:CreateBucket ({self._where()})")) from exc
            raise self._translate(exc, self.bucket) from exc
        except BotoCoreError as exc:
            raise self._translate(exc, self.bucket) from exc
        log.info("created S3 bucket %r (it did not exist) at %s", self.bucket,
                 self.endpoint or "AWS", extra={"bucket": self.bucket})

    # -- helpers ------------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/"):
            raise ValueError(f"invalid object key: {key!r}")
        return f"{self.prefix}/{key}" if self.prefix else key

    def _rel(self, full: str) -> str:
        return full[len(self.prefix) + 1 :] if self.prefix else full

    def _where(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}"
        return f"{where} at {self.endpoint}" if self.endpoint else where

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return redact(text)

    def _translate(self, exc: BaseException, key: str) -> StorageError:
        # The transfer manager wraps client errors (S3UploadFailedError); find the original.
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ClientError | BotoCoreError):
            cause = cause.__cause__ or cause.__context__
        err = cause if cause is not None else exc
        if isinstance(err, ClientError):
            code = str(err.response.get("Error", {}).get("Code", ""))
            status = str(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            message = str(err.response.get("Error", {}).get("Message", "")) or code or status
            if code == "NoSuchBucket":
                return self._no_bucket()
            if code in _NOT_FOUND or status == "404":
                return ObjectNotFound(key)
            if code in _AUTH or status in ("401", "403"):
                return StorageAuthError(
                    self._clean(f"S3 refused the credentials for {self._where()}: {code} {message}")
                )
            text = f"S3 error on {key} ({self._where()}): {code} {message}"
            return StorageUnavailable(self._clean(text))
        if isinstance(err, NoCredentialsError | PartialCredentialsError):
            return StorageAuthError(f"no usable S3 credentials for {self._where()}: {err}")
        return StorageUnavailable(self._clean(f"S3 unreachable ({self._where()}): {err}"))

    def _no_bucket(self) -> StorageUnavailable:
        return StorageUnavailable(f"S3 bucket {self.bucket!r} does not exist ({self._where()})")

    def _bucket_exists(self) -> bool:
        try:
            self._client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            if status == 404 or code in ("NoSuchBucket", "404", "NotFound"):
                return False
            raise
        return True

    def _call(self, key: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a boto3 call in this worker thread, translating its errors."""
        try:
            return fn(*args, **kwargs)
        except _SDK_ERRORS as exc:
            err = self._translate(exc, key)
            if isinstance(err, ObjectNotFound | StorageAuthError):
                # Some servers answer 404 or 403 for a missing bucket: say which it is.
                try:
                    exists = self._bucket_exists()
                except (ClientError, BotoCoreError):
                    exists = True
                if not exists:
                    raise self._no_bucket() from exc
            raise err from exc

    async def _run(self, key: str, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        return await asyncio.to_thread(self._call, key, fn, *args, **kwargs)

    # -- protocol -----------------------------------------------------------------------------

    def _upload(self, key: str, path: Path) -> ObjectInfo:
        sha, size = _sha256_file(path)
        self._client.upload_file(
            str(path), self.bucket, self._key(key),
            ExtraArgs={"Metadata": {META_SHA256: sha}}, Config=self._transfer,
        )
        head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        return ObjectInfo(key, size, sha, head.get("LastModified"))

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        return await self._run(key, self._upload, key, Path(path))

    def _upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        sha = hashlib.sha256(data).hexdigest()
        self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=data, Metadata={META_SHA256: sha}
        )
        return ObjectInfo(key, len(data), sha, None)

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        return await self._run(key, self._upload_bytes, key, bytes(data))

    def _download(self, key: str, path: Path) -> ObjectInfo:
        info = self._stat(key)
        self._client.download_file(self.bucket, self._key(key), str(path), Config=self._transfer)
        size = os.path.getsize(path)
        return ObjectInfo(key, size, info.sha256, info.modified)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        return await self._run(key, self._download, key, Path(path))

    def _get_range(self, key: str, offset: int, length: int) -> bytes:
        """One range of an object. A body cut off mid-read is read again (the request's own
        retries do not cover the body)."""
        rng = f"bytes={offset}-{offset + length - 1}"
        for attempt in range(1, self._read_attempts + 1):
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key), Range=rng)
            body = resp["Body"]
            try:
                data: bytes = body.read()
                return data
            except BotoCoreError:
                if attempt == self._read_attempts:
                    raise
            finally:
                body.close()
        raise AssertionError("unreachable")

    async def open_stream(self, key: str) -> ObjectStream:
        """The object as consecutive ranged GETs, several in flight (see PartStream)."""
        info = await self._run(key, self._stat, key)

        def fetch(offset: int, length: int) -> bytes:
            return self._call(key, self._get_range, key, offset, length)

        return PartStream(info.size, fetch, part_bytes=self.part_bytes, name="s3-read")

    def _download_bytes(self, key: str) -> bytes:
        resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
        body = resp["Body"]
        try:
            data: bytes = body.read()
            return data
        finally:
            body.close()

    async def download_bytes(self, key: str) -> bytes:
        return await self._run(key, self._download_bytes, key)

    def _stat(self, key: str) -> ObjectInfo:
        head = self._client.head_object(Bucket=self.bucket, Key=self._key(key))
        meta = head.get("Metadata") or {}
        size = int(head["ContentLength"])
        return ObjectInfo(key, size, meta.get(META_SHA256), head.get("LastModified"))

    async def stat(self, key: str) -> ObjectInfo:
        return await self._run(key, self._stat, key)

    def _list(self, prefix: str) -> list[ObjectInfo]:
        full = self._key(prefix) if prefix else (f"{self.prefix}/" if self.prefix else "")
        out: list[ObjectInfo] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
            for obj in page.get("Contents", []):
                rel = self._rel(obj["Key"])
                out.append(ObjectInfo(rel, int(obj["Size"]), None, obj.get("LastModified")))
        out.sort(key=lambda i: i.key)
        return out

    async def list(self, prefix: str) -> list[ObjectInfo]:
        return await self._run(prefix, self._list, prefix)

    async def delete(self, key: str) -> None:
        await self._run(key, self._client.delete_object, Bucket=self.bucket, Key=self._key(key))

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.close)
