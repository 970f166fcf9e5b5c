from __future__ import annotations

from pathlib import Path

import pytest

from harmonylite.bus.names import namespace
from harmonylite.cli.main import main
from harmonylite.config import load_config, parse_config
from harmonylite.errors import ConfigError


def test_defaults_follow_harmonylite() -> None:
    cfg, warnings = parse_config({"db_path": "/data/app.db"})
    assert warnings == []
    assert cfg.seq_map_path == "/data/seq-map.cbor"  # beside the database, not /tmp
    assert (cfg.publish, cfg.replicate, cfg.scan_max_changes, cfg.cleanup_interval) == (
        True, True, 512, 5000)
    rl = cfg.replication_log
    assert (rl.shards, rl.max_entries, rl.replicas, rl.compress, rl.update_existing) == (
        1, 1024, 1, True, False)
    snap = cfg.snapshot
    assert (snap.enabled, snap.store, snap.interval, snap.leader_ttl, snap.keep, snap.compress) == (
        True, "nats", 3_600_000, 30_000, 3, True)
    assert cfg.nats.subject_prefix == "harmonylite-change-log"
    assert namespace(cfg).stream(2) == "harmonylite-changes-c-2"
    assert namespace(cfg).subject(2) == "harmonylite-change-log-2"
    assert namespace(cfg).snapshot_bucket == "harmonylite-changes-snapshot-store"
    assert cfg.node_id > 0
    assert parse_config({})[0].node_id == cfg.node_id  # stable: derived from the machine id


def test_node_id_override_and_unknown_keys_warn() -> None:
    cfg, warnings = parse_config({"node_id": 4, "bogus": 1, "nats": {"nope": True}}, node_id=9)
    assert cfg.node_id == 9
    assert any("'bogus'" in w for w in warnings)
    assert any("'nats.nope'" in w for w in warnings)


@pytest.mark.parametrize(
    ("data", "key", "allowed"),
    [
        ({"replication_log": {"shards": 0}}, "replication_log.shards", "between 1 and 1024"),
        ({"snapshot": {"store": "ftp"}}, "snapshot.store", "nats, s3, sftp, webdav, file"),
        ({"publish": "yes"}, "publish", "boolean"),
        ({"nats": {"urls": "nats://x"}}, "nats.urls", "array of strings"),
        ({"snapshot": {"store": "s3"}}, "snapshot.s3.bucket", "required"),
        ({"logging": {"format": "xml"}}, "logging.format", "console, json"),
    ],
)
def test_bad_values_name_key_value_and_allowed(data: dict[str, object], key: str,
                                               allowed: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    assert err.value.key == key
    assert allowed in str(err.value)


def test_cli_exits_2_on_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("scan_max_changes = -3\n")
    for flag in ("-config", "--config"):
        assert main([flag, str(conf)]) == 2
        err = capsys.readouterr().err
        assert "scan_max_changes" in err
        assert "-3" in err
        assert "between 1 and 1000000" in err


def test_cli_version_and_unknown_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-version"]) == 0
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.count("harmonylite 0.") == 2
    assert main(["-no-such-flag"]) == 2


def test_missing_config_file_means_defaults(tmp_path: Path) -> None:
    cfg, _ = load_config(tmp_path / "absent.toml", node_id=3)
    assert cfg.node_id == 3 and cfg.snapshot.store == "nats"


def test_cleanup_flag_removes_everything(tmp_path: Path) -> None:
    import sqlite3

    from harmonylite.cdc.install import harmonylite_objects, install

    db = tmp_path / "d.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("CREATE TABLE t(id INTEGER PRIMARY KEY)")
    install(conn)
    assert harmonylite_objects(conn)
    conn.close()
    conf = tmp_path / "c.toml"
    conf.write_text(f'db_path = "{db}"\n')
    assert main(["-config", str(conf), "-cleanup"]) == 0
    conn = sqlite3.connect(db)
    assert harmonylite_objects(conn) == []
    assert conn.execute("SELECT name FROM sqlite_master").fetchall() == [("t",)]


def test_documented_example_lists_every_key_and_parses_cleanly() -> None:
    import dataclasses
    import tomllib

    from harmonylite.config import Config

    example = Path(__file__).parents[2] / "docs" / "config.example.toml"
    data = tomllib.loads(example.read_text())
    _, warnings = parse_config(data)
    assert warnings == []

    def keys(obj: object, prefix: str = "") -> set[str]:
        out: set[str] = set()
        for f in dataclasses.fields(obj):  # type: ignore[arg-type]
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                out |= keys(value, f"{prefix}{f.name}.")
            else:
                out.add(f"{prefix}{f.name}")
        return out

    text = example.read_text()
    for key in keys(Config()) - {"cluster.cluster_addr", "cluster.cluster_peers",
                                 "cluster.leaf_servers"}:
        assert f"{key.rsplit('.', 1)[-1]} =" in text, f"{key} missing from the example"
