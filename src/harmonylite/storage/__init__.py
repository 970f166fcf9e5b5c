"""Snapshot stores: one protocol (:class:`ObjectStore`), five backends and a factory.

``open_store`` matches on ``snapshot.store`` and wraps the backend in a :class:`SealedStore`
(``[snapshot.encryption]``: seals what it writes, opens sealed objects it reads); backends import
their SDK lazily so that a node using one store never imports the others. ``redact`` strips
credentials from URLs and query strings before they reach a log line or an error message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from harmonylite.age_keys import load_keys
from harmonylite.errors import ConfigError

from .base import ObjectInfo, ObjectStore
from .sealed import SealedStore

if TYPE_CHECKING:
    import nats.js

    from harmonylite.config import SnapshotConfig

__all__ = ["ObjectInfo", "ObjectStore", "SealedStore", "open_store", "redact"]

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]*@")
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;](?:secret|password|passwd|pass|pwd|token|session_token|access_token"
    r"|sig|signature|x-amz-signature|x-amz-security-token|x-amz-credential)=)[^&#\s'\"]*",
    re.IGNORECASE,
)
REDACTED = "***"
# NATS takes a token as the whole user part: ``nats://TOKEN@host``.
_NATS_TOKEN = re.compile(r"(?P<scheme>(?:nats|tls|ws|wss)://)[^:/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """Remove passwords and secrets from every URL in ``text``.

    ``sftp://user:pass@host/p`` becomes ``sftp://user:***@host/p`` and ``?login=u&secret=p``
    becomes ``?login=u&secret=***``; a NATS token URL ``nats://TOKEN@host`` becomes
    ``nats://***@host``.
    """
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:{REDACTED}@", text)
    text = _NATS_TOKEN.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{REDACTED}", text)


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
