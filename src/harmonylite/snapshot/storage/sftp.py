"""Placeholder until the backend lands."""

from __future__ import annotations

from harmonylite.config import SftpConfig
from harmonylite.errors import StorageUnavailable

from .base import ObjectStore


class SftpStore:
    @classmethod
    async def open(cls, cfg: SftpConfig) -> ObjectStore:
        raise StorageUnavailable("the sftp snapshot store is not implemented yet")
