"""Fixtures for the snapshot store contract suite: one real server per backend on 127.0.0.1.

Slow servers (SeaweedFS) are started once per session; every test gets its own namespace in
them (a fresh path prefix, directory or bucket), so the tests stay independent.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import nats.js.errors
import pytest
from storage_backends import S3_BUCKET, Backend, Opener

from harmonylite.config import (
    FileStoreConfig,
    S3Config,
    SftpConfig,
    SnapshotConfig,
    WebdavConfig,
)
from harmonylite.storage import ObjectStore, open_store
from servers import NatsServer, free_port
from storage_servers import SSHD, SeaweedFS, WsgiDAV, ssh_keygen

BACKENDS = ["file", "s3", "sftp", "webdav", "nats"]


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweed")).start()
    try:
        server.create_bucket(S3_BUCKET)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SSHD]:
    server = SSHD(tmp_path_factory.mktemp("sshd")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def wsgidav(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WsgiDAV]:
    server = WsgiDAV(tmp_path_factory.mktemp("wsgidav")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def shared_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path_factory.mktemp("nats") / "store").start()
    try:
        yield server
    finally:
        server.stop()


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=BACKENDS)
async def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Backend]:
    kind: str = request.param
    opened: list[ObjectStore] = []

    def tracked(make: Opener) -> Opener:
        async def opener() -> ObjectStore:
            store = await make()
            opened.append(store)
            return store

        return opener

    b: Backend
    if kind == "file":
        root = tmp_path / "file-store"
        blocker = tmp_path / "not-a-dir"
        blocker.write_bytes(b"")

        b = Backend(
            kind,
            tracked(lambda: open_store(
                SnapshotConfig(store="file", file=FileStoreConfig(str(root))))),
            skip_auth_reason="a local directory has no credentials (and root bypasses modes)",
            stopped=(tracked(lambda: open_store(SnapshotConfig(
                store="file", file=FileStoreConfig(str(blocker / "store"))))), "no-secret"),
        )
    elif kind == "s3":
        seaweed: SeaweedFS = request.getfixturevalue("seaweed")
        prefix = _unique("contract")

        def s3cfg(endpoint: str, secret: str) -> SnapshotConfig:
            return SnapshotConfig(store="s3", s3=S3Config(
                endpoint=endpoint, bucket=S3_BUCKET, path=prefix, region="us-east-1",
                force_path_style=True, use_ssl=False, access_key=seaweed.access_key,
                secret=secret))

        host = seaweed.endpoint.removeprefix("http://")
        dead_secret = "s3-dead-secret-0xC0FFEE"
        b = Backend(
            kind,
            # Endpoint without scheme, as in the seed ("minio:9000"); use_ssl=false picks http.
            tracked(lambda: open_store(s3cfg(host, seaweed.secret_key))),
            skip_auth_reason="SeaweedFS without an IAM config accepts any access key",
            stopped=(tracked(lambda: open_store(
                s3cfg(f"127.0.0.1:{free_port()}", dead_secret))), dead_secret),
        )
    elif kind == "sftp":
        sshd: SSHD = request.getfixturevalue("sshd")
        remote = f"{tmp_path}/sftp-root/{_unique('store')}"
        wrong_key = ssh_keygen(tmp_path / "wrong_key")

        def sftpcfg(port: int, key: Path, password: str = "") -> SnapshotConfig:
            userinfo = f"root:{password}" if password else "root"
            return SnapshotConfig(store="sftp", sftp=SftpConfig(
                url=f"sftp://{userinfo}@127.0.0.1:{port}{remote}", key_file=str(key),
                known_hosts=str(sshd.known_hosts)))

        dead_password = "sftp-dead-pass-0xBEEF"
        b = Backend(
            kind,
            tracked(lambda: open_store(sftpcfg(sshd.port, sshd.client_key))),
            bad_credentials=(tracked(lambda: open_store(sftpcfg(
                sshd.port, wrong_key, "sftp-wrong-pass-0xF00D"))), "sftp-wrong-pass-0xF00D"),
            stopped=(tracked(lambda: open_store(sftpcfg(
                free_port(), sshd.client_key, dead_password))), dead_password),
        )
    elif kind == "webdav":
        dav: WsgiDAV = request.getfixturevalue("wsgidav")
        directory = f"/{_unique('store')}/snaps"

        def davcfg(port: int, secret: str) -> SnapshotConfig:
            url = (f"http://127.0.0.1:{port}/?dir={directory}&login={dav.user}"
                   f"&secret={secret}")
            return SnapshotConfig(store="webdav", webdav=WebdavConfig(url=url))

        b = Backend(
            kind,
            tracked(lambda: open_store(davcfg(dav.port, dav.password))),
            bad_credentials=(tracked(lambda: open_store(davcfg(dav.port, "dav-wrong-0xABCD"))),
                             "dav-wrong-0xABCD"),
            stopped=(tracked(lambda: open_store(davcfg(free_port(), dav.password))),
                     dav.password),
            atomic_overwrite=False,
        )
    else:
        server: NatsServer = request.getfixturevalue("shared_nats")
        nc = await nats.connect(server.url, connect_timeout=2)
        bucket = _unique("contract")
        js = nc.jetstream(timeout=3)

        b = Backend(
            kind,
            tracked(lambda: open_store(SnapshotConfig(store="nats"), js=js, bucket=bucket)),
            skip_auth_reason="NATS credentials belong to the connection, not to the store",
        )

        async def close_nats() -> None:
            try:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_object_store(bucket)
            finally:
                await nc.close()

        b.cleanup.append(close_nats)

    try:
        yield b
    finally:
        for store in opened:
            await store.aclose()
        for fn in b.cleanup:
            await fn()


@pytest.fixture
async def store(backend: Backend) -> ObjectStore:
    return await backend.open()
