"""Backend-specific cases the shared contract cannot express: servers going away under an open
store, SFTP password logins and host keys, S3 multipart uploads, URL redaction."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncssh
import nats
import pytest
from boto3.s3.transfer import TransferConfig
from storage_backends import S3_BUCKET, assert_no_secret

from harmonylite.config import S3Config, SftpConfig, SnapshotConfig, WebdavConfig
from harmonylite.errors import ObjectNotFound, StorageAuthError, StorageUnavailable
from harmonylite.redact import redact
from harmonylite.storage import open_store
from harmonylite.storage.s3 import S3Store, endpoint_url
from servers import NatsServer
from storage_servers import SeaweedFS, WsgiDAV

MB = 1024 * 1024


# -- servers stopping under an open store -----------------------------------------------------


async def test_nats_server_stopped(nats_server: NatsServer) -> None:
    nc = await nats.connect(nats_server.url, connect_timeout=1, reconnect_time_wait=0.2,
                            max_reconnect_attempts=-1)
    try:
        js = nc.jetstream(timeout=1.5)
        store = await open_store(SnapshotConfig(store="nats"), js=js, bucket="stopping")
        await store.upload_bytes("snapshots/a.json", b"a")
        nats_server.stop()
        with pytest.raises(StorageUnavailable):
            await store.list("snapshots/")
        with pytest.raises(StorageUnavailable):
            await store.download_bytes("snapshots/a.json")
        with pytest.raises(StorageUnavailable):
            await store.upload_bytes("snapshots/b.json", b"b")
        # Back again: the same store works once the client has reconnected.
        nats_server.start()
        deadline = asyncio.get_running_loop().time() + 15
        while not nc.is_connected:
            assert asyncio.get_running_loop().time() < deadline, "no reconnect"
            await asyncio.sleep(0.05)
        assert await store.download_bytes("snapshots/a.json") == b"a"
    finally:
        await nc.close()


async def test_webdav_server_stopped(tmp_path: Path) -> None:
    dav = WsgiDAV(tmp_path / "dav").start()
    try:
        url = f"{dav.base_url}/?dir=/s&login={dav.user}&secret={dav.password}"
        store = await open_store(SnapshotConfig(store="webdav", webdav=WebdavConfig(url=url)))
        await store.upload_bytes("snapshots/a.json", b"a")
        assert (dav.root / "s" / "snapshots" / "a.json").read_bytes() == b"a"
        dav.stop()
        for op in (store.list("snapshots/"), store.stat("snapshots/a.json"),
                   store.upload_bytes("snapshots/b.json", b"b")):
            with pytest.raises(StorageUnavailable) as err:
                await op
            assert_no_secret(err.value, dav.password)
        await store.aclose()
    finally:
        dav.stop()


# -- SFTP: password in the URL, host keys, reconnects (asyncssh's in-process server) ----------

PASSWORD = "pw-in-url-0x5EC"


@dataclass
class SftpServer:
    port: int
    root: Path
    known_hosts: Path
    connections: list[asyncssh.SSHServerConnection]


@pytest.fixture
async def sftp_password_server(tmp_path: Path) -> AsyncIterator[SftpServer]:
    root = tmp_path / "sftp-root"
    root.mkdir()
    connections: list[asyncssh.SSHServerConnection] = []

    class Server(asyncssh.SSHServer):
        def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
            connections.append(conn)

        def begin_auth(self, username: str) -> bool:
            return True

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, password: str) -> bool:
            return username == "backup" and password == PASSWORD

    host_key = asyncssh.generate_private_key("ssh-ed25519")
    acceptor = await asyncssh.listen(
        "127.0.0.1", 0, server_host_keys=[host_key], server_factory=Server,
        sftp_factory=lambda chan: asyncssh.SFTPServer(chan, chroot=str(root)),
    )
    port = acceptor.get_port()
    known_hosts = tmp_path / "known_hosts"
    public = host_key.export_public_key().decode().strip()
    known_hosts.write_text(f"[127.0.0.1]:{port} {public}\n")
    try:
        yield SftpServer(port, root, known_hosts, connections)
    finally:
        acceptor.close()
        for conn in connections:
            conn.close()
        await acceptor.wait_closed()


def _sftp_cfg(server: SftpServer, password: str = PASSWORD, **kw: object) -> SnapshotConfig:
    sftp = SftpConfig(url=f"sftp://backup:{password}@127.0.0.1:{server.port}/backups/node",
                      known_hosts=str(server.known_hosts))
    if kw:
        sftp = SftpConfig(**{**sftp.__dict__, **kw})  # type: ignore[arg-type]
    return SnapshotConfig(store="sftp", sftp=sftp)


async def test_sftp_password_login_and_reconnect(sftp_password_server: SftpServer,
                                                 tmp_path: Path) -> None:
    store = await open_store(_sftp_cfg(sftp_password_server))
    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(3 * MB + 1))
        info = await store.upload("snapshots/a.db", src)
        assert info.sha256 == hashlib.sha256(src.read_bytes()).hexdigest()
        on_disk = sftp_password_server.root / "backups" / "node" / "snapshots" / "a.db"
        assert on_disk.read_bytes() == src.read_bytes()
        # The server drops the connection: the next call reconnects by itself.
        for conn in sftp_password_server.connections:
            conn.close()
        assert [i.key for i in await store.list("snapshots/")] == ["snapshots/a.db"]
        with pytest.raises(ObjectNotFound):
            await store.stat("snapshots/b.db")
    finally:
        await store.aclose()


async def test_sftp_wrong_password(sftp_password_server: SftpServer) -> None:
    wrong = "wrong-pw-0xDEAD"
    store = await open_store(_sftp_cfg(sftp_password_server, wrong))
    with pytest.raises(StorageAuthError) as err:
        await store.list("snapshots/")
    assert_no_secret(err.value, wrong)
    assert "backup" in str(err.value)  # says who was refused, not with what
    await store.aclose()


async def test_sftp_unknown_host_key(sftp_password_server: SftpServer, tmp_path: Path) -> None:
    other = tmp_path / "other_known_hosts"
    other.write_text("")
    store = await open_store(_sftp_cfg(sftp_password_server, known_hosts=str(other)))
    with pytest.raises(StorageAuthError, match="host key"):
        await store.list("snapshots/")
    await store.aclose()
    insecure = await open_store(_sftp_cfg(sftp_password_server, known_hosts=str(other),
                                          insecure_ignore_host_key=True))
    assert await insecure.list("snapshots/") == []
    await insecure.aclose()


# -- S3 ---------------------------------------------------------------------------------------


async def test_s3_multipart_and_metadata(seaweed: SeaweedFS, tmp_path: Path) -> None:
    cfg = S3Config(endpoint=seaweed.endpoint, bucket=S3_BUCKET, path="/multi/part/",
                   force_path_style=True, use_ssl=False, access_key=seaweed.access_key,
                   secret=seaweed.secret_key, region="us-east-1")
    store = await S3Store.open(cfg)
    # Multipart from 5 MiB (S3's smallest part) so that a 12 MiB file takes three parts.
    store._transfer = TransferConfig(multipart_threshold=5 * MB, multipart_chunksize=5 * MB)
    try:
        src = tmp_path / "big"
        src.write_bytes(os.urandom(12 * MB + 3))
        digest = hashlib.sha256(src.read_bytes()).hexdigest()
        await store.upload("snapshots/m.db", src)
        head = seaweed.client().head_object(Bucket=S3_BUCKET, Key="multi/part/snapshots/m.db")
        assert head["ContentLength"] == 12 * MB + 3
        assert (await store.stat("snapshots/m.db")).sha256 == digest
        dst = tmp_path / "out"
        down = await store.download("snapshots/m.db", dst)
        assert down.sha256 == digest
        assert dst.read_bytes() == src.read_bytes()
    finally:
        await store.aclose()


async def test_s3_missing_bucket_is_created(seaweed: SeaweedFS) -> None:
    # HarmonyLite creates a missing bucket; so does harmonylite (a refusal to create it is an
    # error naming the bucket and the permission: see test_dropin)
    cfg = S3Config(endpoint=seaweed.endpoint, bucket="no-such-bucket-here", use_ssl=False,
                   force_path_style=True, access_key="k", secret="s3-secret-0x77",
                   region="us-east-1")
    store = await open_store(SnapshotConfig(store="s3", s3=cfg))
    with pytest.raises(ObjectNotFound):
        await store.stat("snapshots/a")
    await store.upload_bytes("snapshots/a", b"a")
    assert [o.key for o in await store.list("snapshots/")] == ["snapshots/a"]
    await store.aclose()


@pytest.mark.parametrize("source", ["environment", "profile", "none"])
async def test_s3_default_credential_chain(seaweed: SeaweedFS, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    creds = tmp_path / "credentials"
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role on loopback
    if source == "environment":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-env")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-0x51")
    elif source == "profile":
        creds.write_text("[default]\naws_access_key_id = from-profile\n"
                         "aws_secret_access_key = profile-secret-0x52\n")
    # No keys in the configuration: boto3's default chain decides.
    cfg = S3Config(endpoint=seaweed.endpoint, bucket=S3_BUCKET, path="chain",
                   force_path_style=True, use_ssl=False, region="us-east-1")
    store = await open_store(SnapshotConfig(store="s3", s3=cfg))
    try:
        if source == "none":
            with pytest.raises(StorageAuthError) as err:
                await store.upload_bytes(f"snapshots/{source}.json", b"{}")
            assert "credentials" in str(err.value).lower()
        else:
            await store.upload_bytes(f"snapshots/{source}.json", b"{}")
            assert await store.download_bytes(f"snapshots/{source}.json") == b"{}"
    finally:
        await store.aclose()


def test_s3_endpoint_forms() -> None:
    assert endpoint_url("s3.us-east-1.amazonaws.com", True) == "https://s3.us-east-1.amazonaws.com"
    assert endpoint_url("minio:9000", False) == "http://minio:9000"
    assert endpoint_url("http://127.0.0.1:9000/", True) == "http://127.0.0.1:9000"
    assert endpoint_url("", True) is None


# -- redaction --------------------------------------------------------------------------------


def test_redact() -> None:
    assert redact("sftp://backup:secret@10.0.0.5:22/mnt") == "sftp://backup:***@10.0.0.5:22/mnt"
    assert redact("sftp://backup@h/p") == "sftp://backup@h/p"
    text = redact("GET https://h/dav?dir=/x&login=u&secret=s3cr3t&x=1 failed")
    assert "s3cr3t" not in text
    assert "login=u" in text
    assert "x=1" in text
    assert "p%40ss" not in redact("see nats://user:p%40ss@host:4222 now")
    assert "tok" not in redact("https://x/y?X-Amz-Signature=tok&X-Amz-Security-Token=tok")


async def test_nats_download_of_deleted_object_does_not_hang(nats_server: NatsServer,
                                                             tmp_path: Path) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        store = await open_store(SnapshotConfig(store="nats"), js=nc.jetstream(), bucket="gone")
        src = tmp_path / "src"
        src.write_bytes(os.urandom(40 * MB))
        await store.upload("snapshots/a.db", src)
        download = asyncio.create_task(store.download("snapshots/a.db", tmp_path / "out"))
        await store.delete("snapshots/a.db")
        try:
            info = await asyncio.wait_for(download, 5)
        except (ObjectNotFound, StorageUnavailable):
            pass  # the object went away under the download: an error, promptly
        else:
            assert info.size == 40 * MB  # it finished first: then it is complete
            assert (tmp_path / "out").read_bytes() == src.read_bytes()
    finally:
        await nc.close()
