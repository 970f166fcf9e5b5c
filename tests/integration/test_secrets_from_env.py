"""Secrets from the environment: ``${VAR}`` in configuration values, expanded at load time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"
PASSWORD = "env-pw-Q7x"  # only ever in the environment, never in a file


def test_nats_password_from_the_environment_replicates_and_is_never_logged(
        tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "ns", extra_args=["--user", "harmony",
                                                     "--pass", PASSWORD]).start()
    try:
        nodes = []
        for i in (1, 2):
            node = NodeProc(tmp_path / f"n{i}", i,
                            {"nats": {"urls": ["${HL_NATS_URL}"], "user_name": "harmony",
                                      "user_password": "${HL_NATS_PASSWORD}"}},
                            env={"HL_NATS_PASSWORD": PASSWORD, "HL_NATS_URL": server.url})
            node.execute(SCHEMA)
            nodes.append(node)
        a, b = (n.start() for n in nodes)
        a.execute("INSERT INTO t VALUES (1, 'x')")
        wait_until(lambda: b.query("SELECT v FROM t") == [("x",)], 20, "replication")
        for n in nodes:
            n.stop()
            assert PASSWORD not in n.config_path.read_text()
            assert PASSWORD not in n.log_text()
    finally:
        server.stop()


def test_a_missing_variable_exits_2_naming_the_key_and_the_variable(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(f'db_path = "{tmp_path / "d.db"}"\n[snapshot]\nstore = "s3"\n'
                    '[snapshot.s3]\nbucket = "b"\nsecret = "${HL_UNSET_SECRET_VAR}"\n')
    env = {k: v for k, v in os.environ.items() if k != "HL_UNSET_SECRET_VAR"}
    proc = subprocess.run([sys.executable, "-m", "harmonylite", "-config", str(conf)],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2, proc.stderr
    assert "snapshot.s3.secret" in proc.stderr
    assert "HL_UNSET_SECRET_VAR" in proc.stderr
    assert "not set" in proc.stderr
