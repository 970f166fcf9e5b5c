"""Placeholder until the backend lands."""

from __future__ import annotations

from harmonylite.config import WebdavConfig
from harmonylite.errors import StorageUnavailable

from .base import ObjectStore


class WebdavStore:
    @classmethod
    async def open(cls, cfg: WebdavConfig) -> ObjectStore:
        raise StorageUnavailable("the webdav snapshot store is not implemented yet")
