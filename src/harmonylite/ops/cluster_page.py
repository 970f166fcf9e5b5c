"""The live page of the cluster on the health server: ``GET /`` is one HTML file
(``cluster_page.html``, no build step: plain JavaScript and inline SVG), which polls
``GET /cluster.json`` every second; both read the same heartbeats as ``cluster status``
(:mod:`harmonylite.cluster.read`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from harmonylite.ops.http_server import Handler, Response

log = logging.getLogger(__name__)

PAGE_PATH = "/"
DATA_PATH = "/cluster.json"

ClusterSource = Callable[[], Awaitable[dict[str, Any]]]


def page() -> bytes:
    return resources.files("harmonylite.ops").joinpath("cluster_page.html").read_bytes()


def cluster_routes(cluster: ClusterSource) -> dict[str, Handler]:
    html = page()

    async def serve_page() -> Response:
        return Response(200, html, "text/html; charset=utf-8")

    async def serve_data() -> Response:
        doc = await cluster()
        return Response(200, json.dumps(doc).encode() + b"\n", "application/json")

    return {PAGE_PATH: serve_page, DATA_PATH: serve_data}
