"""Placeholder until the backend lands."""

from __future__ import annotations

from harmonylite.config import S3Config
from harmonylite.errors import StorageUnavailable

from .base import ObjectStore


class S3Store:
    @classmethod
    async def open(cls, cfg: S3Config) -> ObjectStore:
        raise StorageUnavailable("the s3 snapshot store is not implemented yet")
