"""The NATS names of a cluster: today's names by default, nothing shared between prefixes."""

from __future__ import annotations

import pytest

from harmonylite.bus.names import Namespace, namespace
from harmonylite.config import parse_config
from harmonylite.errors import ConfigError
from harmonylite.node.shared_settings import SHARED, Record, own_settings


def names_of(nats: dict[str, object], **replication_log: object) -> Namespace:
    cfg, _ = parse_config({"nats": nats, "replication_log": replication_log})
    return namespace(cfg)


def every_name(ns: Namespace) -> set[str]:
    return {*ns.streams(), *ns.subjects().values(), ns.lease_bucket, ns.schema_bucket,
            ns.settings_bucket, ns.snapshot_bucket, ns.large_changes_bucket,
            ns.heartbeat_bucket, ns.last_seen_bucket}


def test_the_defaults_are_harmonylites_names() -> None:
    ns = names_of({}, shards=2)
    assert ns.streams() == ["harmonylite-changes-c-1", "harmonylite-changes-c-2"]
    assert ns.subject(2) == "harmonylite-change-log-2"
    assert ns.lease_bucket == "e-harmonylite"
    assert ns.schema_bucket == "harmonylite-schema-registry"
    assert ns.snapshot_bucket == "harmonylite-changes-snapshot-store"
    assert ns.large_changes_bucket == "harmonylite-changes-large-changes"
    assert ns.heartbeat_bucket == "harmonylite-changes-heartbeats"
    assert ns.last_seen_bucket == "harmonylite-changes-last-seen"
    assert names_of({}, compress=False).stream(1) == "harmonylite-changes-1"


def test_two_prefixes_share_no_name() -> None:
    a = names_of({"stream_prefix": "a", "subject_prefix": "a-log"}, shards=4)
    b = names_of({"stream_prefix": "b", "subject_prefix": "b-log"}, shards=4)
    default = names_of({}, shards=4)
    assert not every_name(a) & every_name(b)
    assert not every_name(a) & every_name(default)
    assert a.lease_bucket == "e-harmonylite-a"
    assert b.schema_bucket == "harmonylite-schema-registry-b"


@pytest.mark.parametrize(("key", "value"), [("stream_prefix", "a.b"), ("stream_prefix", "a b"),
                                            ("stream_prefix", ""), ("subject_prefix", "a.*"),
                                            ("subject_prefix", "a..b")])
def test_a_prefix_that_cannot_name_streams_or_buckets_is_refused(key: str, value: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config({"nats": {key: value}})
    assert f"nats.{key}" in str(err.value)


def test_shared_settings_are_declared_once_and_compared() -> None:
    cfg, _ = parse_config({"replication_log": {"shards": 4}})
    assert set(own_settings(cfg)) == {s.key for s in SHARED} >= {
        "replication_log.shards", "replication_log.compress", "nats.stream_prefix",
        "nats.subject_prefix"}
    record = Record({**own_settings(cfg), "replication_log.shards": 1})
    [diff] = record.differences(cfg)
    assert str(diff) == "replication_log.shards = 4 on this node, the cluster's is 1"
    # A key declared after the record was written is not held against the node.
    older = Record({"replication_log.shards": 4})
    assert older.differences(cfg) == []
