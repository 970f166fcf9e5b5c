"""The health fields and metrics a running node exposes are exactly the documented ones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from harmonylite.docgen.health_fields import FIELDS
from harmonylite.docgen.monitoring_ref import metric_rows
from nodes import NodeProc, wait_until
from servers import NatsServer, free_port


def flatten(body: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of the document, with stream names as ``<stream>``; a documented path is a
    leaf even when its value is an object (``schema.parked``: table -> count)."""
    out: set[str] = set()
    for key, value in body.items():
        path = prefix + key
        if path not in FIELDS and any(f.startswith(prefix + "<") for f in FIELDS):
            placeholder = next(f for f in FIELDS if f.startswith(prefix + "<"))
            path = prefix + placeholder[len(prefix):].split(".")[0]
        if path in FIELDS or not isinstance(value, dict):
            out.add(path)
        else:
            out |= flatten(value, path + ".")
    return out


def test_health_document_and_metrics_match_the_reference(tmp_path: Path,
                                                         nats_server: NatsServer) -> None:
    health_port, metrics_port = free_port(), free_port()
    node = NodeProc(tmp_path / "n1", 1, {
        "nats": {"urls": [nats_server.url]},
        "replication_log": {"shards": 2},
        "snapshot": {"store": "file", "file": {"path": str(tmp_path / "snaps")},
                     "archive": True, "archive_interval": 200},
        "health_check": {"enable": True, "bind": f"127.0.0.1:{health_port}"},
        "prometheus": {"enable": True, "bind": f"127.0.0.1:{metrics_port}"},
    })
    node.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT)")
    node.start()
    node.execute("INSERT INTO t VALUES (1, 'x')")
    health = f"http://127.0.0.1:{health_port}/health"
    wait_until(lambda: httpx.get(health, timeout=5).json()["snapshot"]["last_id"] is not None,
               60, "the first snapshot")
    # The archive's fields are there once it wrote the first segment.
    wait_until(lambda: (httpx.get(health, timeout=5).json()["archive"]
                        ["newest_segment_age_seconds"]) is not None, 60, "the first segment")
    body = httpx.get(health, timeout=5).json()
    assert flatten(body) == set(FIELDS), body

    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    exposed = {line.split(" ")[2].removesuffix("_total") for line in text.splitlines()
               if line.startswith("# TYPE ")
               and not line.split(" ")[2].endswith("_created")}  # the client library's own
    documented = {f"harmonylite_{name}".removesuffix("_total") for name, *_ in metric_rows()}
    assert exposed == documented
    node.stop()
