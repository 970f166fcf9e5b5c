"""The node's small HTTP servers (health and the live page, metrics), on aiohttp's low-level
server: GET and HEAD on a few fixed paths.

aiohttp refuses what is malformed (400) and request heads over :data:`MAX_LINE` bytes a line or
:data:`MAX_HEADERS` lines; a client that has not sent a whole request head within
:data:`HEAD_TIMEOUT` seconds of connecting (or of its previous answer) is disconnected; a request
with a body is refused (the paths take none). Handlers run on the node's event loop and must be
quick: each reads state the node keeps, or NATS with a bound.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from aiohttp import web

from harmonylite.errors import ConfigError

log = logging.getLogger(__name__)

HEAD_TIMEOUT = 10.0  # seconds a client may take to send a request head
MAX_LINE = 8190  # bytes in the request line or one header line
MAX_HEADERS = 64
SHUTDOWN_SECONDS = 1.0  # requests in flight get this long when the server closes


# --- bind addresses --------------------------------------------------------------------------
_BIND = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%\w]+)\]|(?P<host>[^:\[\]\s]*)):(?P<port>\d{1,5})$")


def parse_bind(bind: str, key: str = "bind") -> tuple[str | None, int]:
    """``"0.0.0.0:8090"``, ``":3010"`` (all interfaces), ``"[::1]:80"``, ``"127.0.0.1:0"``.

    Returns ``(host, port)`` with ``host=None`` for every interface. ``key`` names the setting in
    the error raised for a malformed value.
    """
    m = _BIND.match(bind.strip())
    port = int(m["port"]) if m else -1
    if m is None or not 0 <= port <= 65535:
        raise ConfigError(key, bind, "must be HOST:PORT or :PORT with a port between 0 and 65535")
    host = m["v6"] if m["v6"] is not None else m["host"]
    if not host:
        # Port 0 on every interface would give each address family its own random port.
        return ("0.0.0.0" if port == 0 else None), port
    return host, port


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)


Handler = Callable[[], Awaitable[Response]]


class HttpServer:
    """GET/HEAD on fixed paths (``routes``: path -> handler); anything else 404 or 405."""

    def __init__(self, routes: Mapping[str, Handler], name: str) -> None:
        self.routes = dict(routes)
        self.name = name
        self.host: str | None = None
        self.port = 0
        self._runner: web.ServerRunner | None = None

    async def start(self, bind: str, key: str = "bind") -> HttpServer:
        host, port = parse_bind(bind, key)
        server = web.Server(self._handle, keepalive_timeout=HEAD_TIMEOUT, max_line_size=MAX_LINE,
                            max_field_size=MAX_LINE, max_headers=MAX_HEADERS, lingering_time=0,
                            access_log=None)
        runner = web.ServerRunner(server, shutdown_timeout=SHUTDOWN_SECONDS, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.host = host
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else port
        log.info("%s listening on %s:%d", self.name, host or "*", self.port)
        return self

    @property
    def url(self) -> str:
        host = self.host if self.host not in (None, "0.0.0.0", "::") else "127.0.0.1"
        if host and ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def close(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        handler = self.routes.get(request.path)
        if handler is None:
            response = Response(404, b"not found\n")
        elif request.method not in ("GET", "HEAD"):
            response = Response(405, b"method not allowed\n", headers={"Allow": "GET, HEAD"})
        elif request.body_exists:
            response = Response(400, b"a request body is not accepted here\n")
        else:
            try:
                response = await handler()
            except Exception:
                log.exception("%s: request for %s failed", self.name, request.path)
                response = Response(500, b"internal error\n")
        headers = {"Content-Type": response.content_type, "Cache-Control": "no-store",
                   **response.headers}
        reply = web.Response(status=response.status, body=response.body, headers=headers)
        if request.body_exists:
            reply.force_close()  # the unread body is not read for the next request
        return reply
