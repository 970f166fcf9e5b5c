"""A snapshot store on a WebDAV server (httpx).

``url`` follows HarmonyLite: ``http(s)://host[:port]/path?dir=/x&login=u&secret=p``; objects live
below ``/path/x/`` and ``login``/``secret`` are sent as HTTP basic auth (never in a URL we show).
Uploads stream the file to a hidden temp name, then MOVE it over the final name with
``Overwrite: T``; downloads stream to the file. Missing parent collections are created (MKCOL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import posixpath
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from datetime import datetime
from email.utils import parsedate_to_datetime
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit, urlunsplit

import httpx

from harmonylite.config import WebdavConfig
from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageError, StorageUnavailable
from harmonylite.redact import redact

from .base import ObjectInfo

CHUNK = 1024 * 1024
TEMP_PREFIX = ".tmp-"
READ_TRIES = 3  # attempts of a read (PROPFIND, GET, HEAD) that met a 5xx answer
DAV = "{DAV:}"
_PROPFIND_BODY = (
    b'<?xml version="1.0" encoding="utf-8"?><d:propfind xmlns:d="DAV:"><d:prop>'
    b"<d:resourcetype/><d:getcontentlength/><d:getlastmodified/></d:prop></d:propfind>"
)


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key: {key!r}")
    return key


def _parse_date(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        return parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None


class WebdavStore:
    name = "webdav"

    def __init__(self, cfg: WebdavConfig, *, timeout: float = 30.0) -> None:
        url = urlsplit(cfg.url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("snapshot.webdav.url must start with http:// or https://")
        query = parse_qs(url.query)
        directory = query.get("dir", [""])[0]
        login = query.get("login", [""])[0] or unquote(url.username or "")
        secret = query.get("secret", [""])[0] or unquote(url.password or "")
        netloc = url.hostname if url.port is None else f"{url.hostname}:{url.port}"
        if ":" in url.hostname:  # IPv6 literal
            netloc = f"[{url.hostname}]" + (f":{url.port}" if url.port else "")
        # The root collection, as a path ending in "/".
        root = posixpath.join("/", url.path.strip("/"), directory.strip("/"))
        self.root = root.rstrip("/") + "/"
        self.origin = urlunsplit((url.scheme, netloc, "", "", ""))
        self._secret = secret
        auth = httpx.BasicAuth(login, secret) if login else None
        self._http = httpx.AsyncClient(
            base_url=self.origin,
            auth=auth,
            timeout=httpx.Timeout(timeout, connect=10.0),
            follow_redirects=False,
        )
        self._made: set[str] = set()

    @classmethod
    async def open(cls, cfg: WebdavConfig) -> WebdavStore:
        return cls(cfg)

    @property
    def where(self) -> str:
        return f"{self.origin}{self.root}"

    # -- helpers ------------------------------------------------------------------------------

    def _path(self, key: str) -> str:
        return self.root + _check_key(key)

    @staticmethod
    def _quote(path: str) -> str:
        return quote(path, safe="/")

    def _clean(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return redact(text)

    def _status_error(self, resp: httpx.Response, key: str, what: str) -> StorageError:
        if resp.status_code == 404:
            return ObjectNotFound(key)
        if resp.status_code in (401, 403):
            return StorageAuthError(
                f"WebDAV {self.where} refused the credentials ({resp.status_code} on {what})"
            )
        text = f"WebDAV {self.where}: {what} {key} failed with HTTP {resp.status_code}"
        return StorageUnavailable(self._clean(text))

    def _net_error(self, exc: httpx.HTTPError) -> StorageUnavailable:
        return StorageUnavailable(self._clean(f"WebDAV {self.where} unreachable: {exc!r}"))

    async def _request(
        self, method: str, path: str, key: str, *, ok: tuple[int, ...], **kwargs: object
    ) -> httpx.Response:
        # Reads are retried on a server error: some servers answer 500 to a listing that races
        # a MOVE in the same collection. Writes are never repeated blindly.
        tries = READ_TRIES if method in ("PROPFIND", "GET", "HEAD") else 1
        for attempt in range(tries):
            try:
                resp = await self._http.request(method, self._quote(path), **kwargs)  # type: ignore[arg-type]
            except httpx.HTTPError as exc:
                raise self._net_error(exc) from exc
            if resp.status_code < 500 or attempt == tries - 1:
                break
            await asyncio.sleep(0.05 * (attempt + 1))
        if resp.status_code not in ok:
            raise self._status_error(resp, key, method)
        return resp

    async def _mkcols(self, directory: str, key: str) -> None:
        """MKCOL every collection from the root down to ``directory`` (a path ending in /)."""
        if directory in self._made:
            return
        parts = [p for p in directory.split("/") if p]
        current = "/"
        for part in parts:
            current += part + "/"
            if current in self._made:
                continue
            # 201 created, 405 already exists (some servers: 301 or 409 when a parent lacks).
            await self._request("MKCOL", current, key, ok=(200, 201, 204, 301, 405))
            self._made.add(current)

    # -- protocol -----------------------------------------------------------------------------

    async def _put(self, key: str, body: AsyncIterator[bytes], digest: hashlib._Hash) -> int:
        dest = self._path(key)
        directory = dest.rsplit("/", 1)[0] + "/"
        await self._mkcols(directory, key)
        tmp = f"{directory}{TEMP_PREFIX}{posixpath.basename(dest)}.{uuid.uuid4().hex}"
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in body:
                digest.update(chunk)
                size += len(chunk)
                yield chunk

        try:
            await self._request("PUT", tmp, key, ok=(200, 201, 204), content=counted())
            await self._request(
                "MOVE", tmp, key, ok=(200, 201, 204),
                headers={"Destination": self.origin + self._quote(dest), "Overwrite": "T"},
            )
        except BaseException:
            with contextlib.suppress(httpx.HTTPError):
                await asyncio.shield(self._http.request("DELETE", self._quote(tmp)))
            raise
        return size

    async def upload(self, key: str, path: Path) -> ObjectInfo:
        fh = await asyncio.to_thread(open, path, "rb")

        async def chunks() -> AsyncIterator[bytes]:
            while data := await asyncio.to_thread(fh.read, CHUNK):
                yield data

        digest = hashlib.sha256()
        try:
            size = await self._put(key, chunks(), digest)
        finally:
            await asyncio.to_thread(fh.close)
        return ObjectInfo(key, size, digest.hexdigest(), None)

    async def upload_bytes(self, key: str, data: bytes) -> ObjectInfo:
        async def chunks() -> AsyncIterator[bytes]:
            yield bytes(data)

        digest = hashlib.sha256()
        size = await self._put(key, chunks(), digest)
        return ObjectInfo(key, size, digest.hexdigest(), None)

    async def download(self, key: str, path: Path) -> ObjectInfo:
        src = self._quote(self._path(key))
        digest = hashlib.sha256()
        size = 0
        try:
            async with self._http.stream("GET", src) as resp:
                if resp.status_code != 200:
                    raise self._status_error(resp, key, "GET")
                modified = _parse_date(resp.headers.get("last-modified"))
                fh = await asyncio.to_thread(open, path, "wb")
                try:
                    async for data in resp.aiter_bytes(CHUNK):
                        await asyncio.to_thread(fh.write, data)
                        digest.update(data)
                        size += len(data)
                finally:
                    await asyncio.to_thread(fh.close)
        except httpx.HTTPError as exc:
            raise self._net_error(exc) from exc
        return ObjectInfo(key, size, digest.hexdigest(), modified)

    async def download_bytes(self, key: str) -> bytes:
        resp = await self._request("GET", self._path(key), key, ok=(200,))
        return resp.content

    async def _propfind(
        self, path: str, key: str, depth: str
    ) -> list[tuple[str, ObjectInfo, bool]]:
        resp = await self._request(
            "PROPFIND", path, key, ok=(207,),
            headers={"Depth": depth, "Content-Type": "application/xml"}, content=_PROPFIND_BODY,
        )
        try:
            tree = ET.fromstring(resp.content)
        except ET.ParseError as exc:
            raise StorageUnavailable(f"WebDAV {self.where}: unreadable PROPFIND reply") from exc
        out: list[tuple[str, ObjectInfo, bool]] = []
        for item in tree.findall(f"{DAV}response"):
            href = unquote(urlsplit(item.findtext(f"{DAV}href") or "").path)
            is_dir = item.find(f".//{DAV}resourcetype/{DAV}collection") is not None
            length = item.findtext(f".//{DAV}getcontentlength") or "0"
            modified = _parse_date(item.findtext(f".//{DAV}getlastmodified"))
            rel = href[len(self.root) :] if href.startswith(self.root) else ""
            rel = rel.rstrip("/")
            size = int(length) if length.strip().isdigit() else 0
            out.append((href, ObjectInfo(rel, size, None, modified), is_dir))
        return out

    async def stat(self, key: str) -> ObjectInfo:
        path = self._path(key)
        entries = await self._propfind(path, key, "0")
        for _href, info, is_dir in entries:
            if is_dir:
                raise ObjectNotFound(key)
            return ObjectInfo(key, info.size, None, info.modified)
        raise ObjectNotFound(key)

    async def list(self, prefix: str) -> list[ObjectInfo]:
        base_rel = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        out: list[ObjectInfo] = []
        pending = [self.root + base_rel]
        while pending:
            collection = pending.pop()
            try:
                entries = await self._propfind(collection, prefix, "1")
            except ObjectNotFound:
                continue
            for href, info, is_dir in entries:
                if href.rstrip("/") == collection.rstrip("/") or not info.key:
                    continue
                name = posixpath.basename(info.key)
                if name.startswith(TEMP_PREFIX):
                    continue
                if is_dir:
                    sub = info.key + "/"
                    if sub.startswith(prefix) or prefix.startswith(sub):
                        pending.append(self.root + sub)
                elif info.key.startswith(prefix):
                    out.append(info)
        return sorted(out, key=lambda i: i.key)

    async def delete(self, key: str) -> None:
        await self._request("DELETE", self._path(key), key, ok=(200, 204, 404))

    async def aclose(self) -> None:
        await self._http.aclose()
