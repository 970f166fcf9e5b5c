"""Placeholder until the backend lands."""

from __future__ import annotations

from typing import Any

from harmonylite.errors import StorageUnavailable

from .base import ObjectStore


class NatsObjectStore:
    @classmethod
    async def open(cls, js: Any, bucket: str, *, replicas: int = 1) -> ObjectStore:
        raise StorageUnavailable("the nats snapshot store is not implemented yet")
