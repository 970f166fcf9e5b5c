"""deploy/: the container and systemd examples load, keep every secret in the environment, and a
node run with their configuration never logs one. (Docker itself is not run here.)"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from harmonylite.config import load_config
from harmonylite.errors import ConfigError
from nodes import NodeProc, wait_until, write_toml
from servers import NatsServer, nats_server_binary
from storage_servers import SeaweedFS

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
# Keys whose values are credentials: in the examples each must be a ${VAR} reference.
SECRET_KEYS = ("snapshot.s3.access_key", "snapshot.s3.secret", "snapshot.s3.session_token",
               "nats.user_password", "snapshot.sftp.url", "snapshot.webdav.url")


def env_example() -> dict[str, str]:
    out = {}
    for line in (DEPLOY / ".env.example").read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def node_environment() -> dict[str, str]:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    env: dict[str, str] = compose["services"]["node1"]["environment"]
    return env


def test_compose_passes_every_variable_the_configuration_names() -> None:
    env = node_environment()
    for name, value in env.items():
        assert re.fullmatch(r"\$\{" + name + r"(:\?[^}]*)?\}", value), (name, value)
    values = str(tomllib.loads((DEPLOY / "config.toml").read_text()))
    named = set(re.findall(r"\$\{(\w+)\}", values))
    assert named == set(env), "config.toml and compose.yaml's environment disagree"
    assert named <= set(env_example())


def test_the_configuration_loads_with_the_example_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    cfg, warnings = load_config(DEPLOY / "config.toml", node_id=2, required=True)
    assert warnings == []
    assert (cfg.node_id, cfg.replication_log.replicas, cfg.snapshot.store) == (2, 3, "s3")
    assert cfg.snapshot.s3.secret == env_example()["S3_SECRET"]
    monkeypatch.delenv("S3_SECRET")
    with pytest.raises(ConfigError, match="S3_SECRET"):
        load_config(DEPLOY / "config.toml", node_id=2, required=True)


def test_no_secret_is_written_in_the_examples() -> None:
    data = tomllib.loads((DEPLOY / "config.toml").read_text())
    for dotted in SECRET_KEYS:
        value: object = data
        for part in dotted.split("."):
            value = value.get(part, "") if isinstance(value, dict) else ""
        assert value == "" or re.fullmatch(r"\$\{\w+\}", str(value)), dotted
    secrets = [v for k, v in env_example().items() if "PASSWORD" in k or "SECRET" in k
               or "ACCESS_KEY" in k]
    for path in DEPLOY.rglob("*"):
        if path.is_file() and path.name != ".env.example":
            text = path.read_text()
            assert not [s for s in secrets if s in text], path
    unit = (DEPLOY / "harmonylite.service").read_text()
    assert "EnvironmentFile=" in unit and "Environment=" not in unit.replace("EnvironmentFile=",
                                                                             "")


def test_the_nats_configuration_is_valid_and_reads_its_password_from_the_environment() -> None:
    def check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run([nats_server_binary(), "-c", str(DEPLOY / "nats.conf"), "-t"],
                              capture_output=True, text=True, timeout=30, env=env)

    base = {k: v for k, v in os.environ.items() if k != "NATS_PASSWORD"}
    assert check({**base, "NATS_PASSWORD": "x"}).returncode == 0
    missing = check(base)
    assert missing.returncode != 0 and "NATS_PASSWORD" in missing.stdout + missing.stderr


def test_a_node_on_the_example_configuration_never_logs_a_secret(tmp_path: Path) -> None:
    weed = SeaweedFS(tmp_path / "weed", identities={"deploy-key": ["Admin", "Read", "List",
                                                                   "Write"]}).start()
    password = "deploy-nats-pw-51"
    server = NatsServer(tmp_path / "ns", extra_args=["--user", "harmonylite",
                                                     "--pass", password]).start()
    try:
        data = tomllib.loads((DEPLOY / "config.toml").read_text())
        data["nats"]["urls"] = [server.url]
        data["replication_log"]["replicas"] = 1  # one server here
        del data["health_check"], data["prometheus"]  # fixed ports
        env = {"NATS_PASSWORD": password, "S3_ENDPOINT": weed.endpoint, "S3_REGION": "us-east-1",
               "S3_BUCKET": "deploy-test", "S3_ACCESS_KEY": "deploy-key",
               "S3_SECRET": "deploy-key-secret"}
        node = NodeProc(tmp_path / "n1", 1, {}, env=env, extra_args=["-node-id", "1"])
        data["db_path"] = str(node.db)
        write_toml(node.config_path, data)
        node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
        node.start()
        node.execute("INSERT INTO t VALUES (1)")
        # With no snapshot in the store, the leader takes one at once.
        wait_until(lambda: "Snapshot saved" in node.log_text(), 60, "the first snapshot")
        saved = node.cli("-node-id", "1", "snapshot", "list")
        assert saved.returncode == 0 and "\np0" in saved.stdout, saved.stderr
        node.stop()
        texts = [node.log_text(), saved.stdout, saved.stderr, node.config_path.read_text()]
        for secret in (password, "deploy-key-secret"):
            assert not [t for t in texts if secret in t], secret
    finally:
        server.stop()
        weed.stop()
