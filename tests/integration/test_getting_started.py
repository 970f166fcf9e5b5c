"""docs/getting-started.md, run as written: three "machines" on loopback, a real NATS cluster
(external nats-servers, or the nodes' embedded servers) and a real S3 (SeaweedFS)."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path

import pytest

from doc_blocks import Machine, Runner, blocks, shim
from nodes import write_toml
from servers import free_port, nats_server_binary
from storage_servers import SeaweedFS

PAGE = Path(__file__).resolve().parents[2] / "docs" / "getting-started.md"
S3_USER = "gs-Vb31"
SECRET = f"{S3_USER}-secret"  # SeaweedFS's secret for that user: only ever in the environment


@pytest.mark.parametrize("variant", ["external", "embedded"])
def test_getting_started_as_written(tmp_path: Path, variant: str) -> None:
    page = PAGE.read_text()
    steps = blocks(page, variant)
    assert any(b.background for b in steps) and any(b.output for b in steps)
    weed = SeaweedFS(tmp_path / "weed", identities={S3_USER: ["Admin", "Read", "List",
                                                             "Write"]}).start()
    bin_dir = tmp_path / "bin"
    shim(bin_dir, "harmonylite", [sys.executable, "-m", "harmonylite"])
    shim(bin_dir, "nats-server", [nats_server_binary()])
    machines = [Machine(n, tmp_path / f"host{n}",
                        {"client": free_port(), "cluster": free_port(), "health": free_port()},
                        bin_dir) for n in (1, 2, 3)]
    for m in machines:
        m.cluster = machines
        m.root.mkdir()
    env = {**os.environ, "S3_ACCESS_KEY": S3_USER, "S3_SECRET": SECRET}
    runner = Runner(machines, env, tmp_path)
    try:
        for block in steps:
            if "file" in block.attrs:
                for m in runner.on(block):
                    write_config(m, block.attrs["file"], block.body, variant, weed)
            elif block.background:
                for m in runner.on(block):
                    runner.start(block, m)
            else:
                for m in runner.on(block):
                    runner.run(block, m, timeout=120)
        logs = runner.logs()
        assert "node started" in logs
    finally:
        runner.stop()
        weed.stop()
    for m in machines:
        for f in m.root.rglob("*.toml"):
            assert SECRET not in f.read_text()
    for log in tmp_path.glob("host*.log"):
        assert SECRET not in log.read_text(errors="replace")


def write_config(m: Machine, doc_path: str, text: str, variant: str, weed: SeaweedFS) -> None:
    """The page's file on machine ``m``; the S3 endpoint is SeaweedFS's, and with the embedded
    servers the page says to leave ``[nats]`` out."""
    data = tomllib.loads(m.rewrite(text))
    if variant == "embedded":
        del data["nats"]
    data["snapshot"]["s3"].update(endpoint=weed.endpoint, region="us-east-1",
                                  force_path_style=True, use_ssl=False)
    path = m.path(doc_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_toml(path, data)
