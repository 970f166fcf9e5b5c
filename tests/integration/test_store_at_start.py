"""A snapshot store that does not answer yet when a node starts (a JetStream cluster still
forming times out on the object store's bucket) is waited for, not fatal."""

from __future__ import annotations

import signal
from pathlib import Path

from nodes import NodeProc, wait_until
from servers import NatsServer

SCHEMA = "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)"


def _conf(deny_object_store: bool) -> str:
    # A request the account may not publish gets no answer: nats-py times out on it, as it does
    # on a bucket whose stream a forming cluster cannot place yet.
    create = "$JS.API.STREAM.CREATE.OBJ_harmonylite-changes-snapshot-store"
    deny = f', deny: ["{create}"]' if deny_object_store else ""
    return ("authorization { users = [ { user: harmony, password: pw-st4rt, permissions: {"
            f' publish: {{ allow: [">"] {deny} }}, subscribe: ">" }} }} ] }}\n')


def test_a_node_waits_for_the_object_store_to_answer_at_start(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "ns", config=_conf(True)).start()
    try:
        node = NodeProc(tmp_path / "n1", 1, {
            "nats": {"urls": [server.url], "user_name": "harmony", "user_password": "pw-st4rt"},
            "snapshot": {"enabled": True, "store": "nats", "interval": 3_600_000},
        })
        node.execute(SCHEMA)
        node.start_async()
        wait_until(lambda: "the snapshot store is not available yet" in node.log_text()
                   or node._dead(), 60, "the node to say it waits for the store")
        assert not node._dead(), node.log_text()
        assert server.proc is not None
        (server.store_dir.parent / f"nats-{server.port}.conf").write_text(_conf(False))
        server.proc.send_signal(signal.SIGHUP)  # the cluster has formed: the bucket answers
        node.wait_started(90)
        node.execute("INSERT INTO t VALUES (1, 'after the wait')")
        assert node.stop() == 0
    finally:
        server.stop()
