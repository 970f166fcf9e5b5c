"""Save, list, verify, restore and retention through the CLI verbs, on all five real stores."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import nats
import pytest
from snapshot_helpers import SEQS, make_cfg, make_db, rows_of, work_dirs

from harmonylite.cli import snapshot as cli
from harmonylite.config import Config
from harmonylite.snapshot.manifest import Manifest
from servers import NatsServer
from storage_servers import SSHD, SeaweedFS, WsgiDAV

BACKENDS = ["file", "nats", "s3", "sftp", "webdav"]


class Backend:
    def __init__(self, store: str, settings: dict[str, Any], nats_url: str = "") -> None:
        self.store = store
        self.settings = settings
        self.nats_url = nats_url

    def js_context(self) -> cli.JsContext | None:
        if not self.nats_url:
            return None
        url = self.nats_url

        @asynccontextmanager
        async def connect() -> AsyncIterator[Any]:
            nc = await nats.connect(url)
            try:
                yield nc.jetstream()
            finally:
                await nc.close()

        return connect


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    kind: str = request.param
    work = tmp_path / f"{kind}-server"
    work.mkdir()
    if kind == "file":
        yield Backend("file", {"file": {"path": str(tmp_path / "store")}})
    elif kind == "nats":
        server = NatsServer(work / "js").start()
        try:
            yield Backend("nats", {"nats": {"bucket": "snapshots-test"}}, server.url)
        finally:
            server.stop()
    elif kind == "s3":
        weed = SeaweedFS(work).start()
        try:
            weed.create_bucket("backups")
            yield Backend("s3", {"s3": {
                "endpoint": weed.endpoint, "bucket": "backups", "path": "cluster-a",
                "region": "us-east-1", "force_path_style": True, "use_ssl": False,
                "access_key": weed.access_key, "secret": weed.secret_key}})
        finally:
            weed.stop()
    elif kind == "sftp":
        try:
            sshd = SSHD(work).start()
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"no sshd: {exc}")
        try:
            yield Backend("sftp", {"sftp": {
                "url": f"sftp://root@127.0.0.1:{sshd.port}{tmp_path / 'sftp-root'}",
                "key_file": str(sshd.client_key), "known_hosts": str(sshd.known_hosts)}})
        finally:
            sshd.stop()
    else:
        dav = WsgiDAV(work).start()
        try:
            yield Backend("webdav", {"webdav": {
                "url": f"{dav.base_url}/?dir=/backups&login={dav.user}&secret={dav.password}"}})
        finally:
            dav.stop()


async def _cli(cfg: Config, backend: Backend, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = await cli.run(cfg, list(argv), js_context=backend.js_context(), stdout=out,
                         stderr=err)
    return code, out.getvalue(), err.getvalue()


async def test_end_to_end_on_every_store(backend: Backend, tmp_path: Path) -> None:
    db = tmp_path / "app.db"
    conn = make_db(db, rows=1500, blob=300)
    temp = tmp_path / "tmp"
    temp.mkdir()
    cfg = make_cfg(db, tmp_path / "store", temp_dir=temp, keep=2, store=backend.store,
                   extra=backend.settings)
    ids = []
    for i in range(3):
        conn.execute("INSERT INTO items(name) VALUES (?)", (f"round {i}",))
        code, out, err = await _cli(cfg, backend, "save")
        assert code == 0, err
        ids.append(out.strip())
    conn.close()

    code, out, err = await _cli(cfg, backend, "list", "--json")
    assert code == 0, err
    listed = [Manifest.from_dict(m) for m in json.loads(out)]
    assert [m.id for m in listed] == [ids[2], ids[1]]  # keep = 2, newest first
    assert listed[0].sequences == SEQS

    code, out, err = await _cli(cfg, backend, "verify", "latest")
    assert (code, out) == (0, f"{ids[2]} ok\n"), err

    target = tmp_path / "restored.db"
    code, out, err = await _cli(cfg, backend, "restore", "latest", "--output", str(target))
    assert code == 0, err
    assert rows_of(target) == rows_of(db)
    check = sqlite3.connect(str(target))
    assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    assert check.execute(
        "SELECT count(*) FROM sqlite_master WHERE name LIKE '\\_\\_harmonylite\\_\\_%' "
        "ESCAPE '\\'").fetchone() == (0,)
    check.close()
    assert work_dirs(temp) == []
