"""Snapshot stores: one protocol (:class:`ObjectStore`), five backends and a factory.

``open_store`` matches on ``snapshot.store`` and wraps the backend in a :class:`SealedStore`
(``[snapshot.encryption]``: seals what it writes, opens sealed objects it reads); backends import
their SDK lazily so that a node using one store never imports the others.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from harmonylite.age_keys import load_keys
from harmonylite.errors import ConfigError

from .base import ObjectInfo, ObjectStore
from .sealed import SealedStore

if TYPE_CHECKING:
    import nats.js

    from harmonylite.config import SnapshotConfig

__all__ = ["ObjectInfo", "ObjectStore", "SealedStore", "open_store"]


async def open_store(
    cfg: SnapshotConfig,
    *,
    js: nats.js.JetStreamContext | None = None,
    bucket: str = "",
) -> ObjectStore:
    """Open the store ``cfg.store`` names, sealing per ``cfg.encryption``. "nats" needs ``js``
    and the bucket name."""
    keys = load_keys(cfg.encryption.recipients, cfg.encryption.identity_file)
    return SealedStore(await _open_backend(cfg, js, bucket), keys)


async def _open_backend(
    cfg: SnapshotConfig, js: nats.js.JetStreamContext | None, bucket: str
) -> ObjectStore:
    store = cfg.store
    if store == "file":
        from .file import FileStore

        if not cfg.file.path:
            raise ConfigError("snapshot.file.path", cfg.file.path, "is required for store 'file'")
        return FileStore(cfg.file.path)
    if store == "s3":
        from .s3 import S3Store

        return await S3Store.open(cfg.s3)
    if store == "sftp":
        from .sftp import SftpStore

        return await SftpStore.open(cfg.sftp)
    if store == "webdav":
        from .webdav import WebdavStore

        return await WebdavStore.open(cfg.webdav)
    if store == "nats":
        from .nats_objects import NatsObjectStore

        if js is None:
            raise ValueError("open_store(store='nats') needs a JetStream context")
        name = bucket or cfg.nats.bucket
        if not name:
            raise ConfigError("snapshot.nats.bucket", name, "a bucket name is required")
        return await NatsObjectStore.open(js, name, replicas=cfg.nats.replicas)
    raise ConfigError("snapshot.store", store, "must be one of nats, s3, sftp, webdav, file")
