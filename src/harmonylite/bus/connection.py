"""The connection to NATS: first attempts, then retried in the background until it works.

One nats-py client is created per node and connects with reconnects allowed and no limit, so a
server that is down when the node starts is retried every ``reconnect_wait_seconds`` for as long
as it takes. :meth:`Connection.wait` lets the caller wait for the first ``connect_retries + 1``
attempts (the node starts without NATS after them; a command gives up), for the connection at
any later time, or for a stop.

Credentials the server refuses are not an outage: waiting cannot fix them. Refused
``connect_retries + 1`` times in a row, they end the wait with :class:`CredentialsRefused`.

Every failed attempt is described in words (:func:`describe_connect_error`): nats-py reports some
failures with exceptions whose text is empty, and an operator must never read an empty reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.errors import AuthorizationError
from nats.errors import Error as NatsClientError
from nats.js import JetStreamContext

from harmonylite.aio import wait_any
from harmonylite.config import NatsConfig
from harmonylite.errors import NatsError
from harmonylite.redact import redact

log = logging.getLogger(__name__)

Callback = Callable[[], Awaitable[None]]
# A JetStream context for as long as the ``async with`` lasts (a command's connection, or one
# handed in by whoever already holds one).
JsContext = Callable[[], AbstractAsyncContextManager[JetStreamContext]]
MIN_RECONNECT_WAIT = 0.25
CONNECT_TIMEOUT = 5.0  # seconds one attempt may take to reach a server and log in


@dataclass
class LinkState:
    connected: bool = False
    closing: bool = False  # set before a deliberate close, so it is not reported as an outage
    on_reconnect: list[Callback] = field(default_factory=list)
    last_error: str | None = None  # why the last attempt failed, while not connected
    urls: str = ""  # the servers, credentials removed (for messages)
    down_since: float | None = None  # time.monotonic() the connection was lost or first tried

    def reason(self) -> str:
        """Why NATS is not connected, for health and logs (never empty)."""
        if self.last_error is None:
            return "NATS is disconnected"
        return f"NATS unreachable at {self.urls}: {self.last_error}"


def _tls_context(cfg: NatsConfig) -> ssl.SSLContext | None:
    if not (cfg.ca_file or cfg.cert_file):
        return None
    ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
    if cfg.cert_file:
        ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
    return ctx


def credentials_refused(exc: BaseException) -> bool:
    if isinstance(exc, AuthorizationError):
        return True
    text = str(exc).lower()
    return isinstance(exc, NatsClientError) and (
        "authorization violation" in text or "authentication" in text)


def describe_connect_error(exc: BaseException) -> str:
    """A failed connection attempt in words: never empty, even when ``str(exc)`` is."""
    if credentials_refused(exc):
        return "the server refused this node's credentials (authorization violation)"
    if isinstance(exc, ssl.SSLError):
        words = getattr(exc, "verify_message", None) or getattr(exc, "reason", None) \
            or exc.strerror or str(exc) or type(exc).__name__
        return f"TLS failed: {words}"
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return f"no answer within {CONNECT_TIMEOUT:.0f} s"
    if isinstance(exc, OSError):
        # asyncio's ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)")
        # carries the address as its text: the errno's words say what happened (and the
        # message names the URL). A resolver error has a negative errno and its own words.
        words = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or ""
        if words:
            return words[0].lower() + words[1:]
    text = str(exc).strip()
    if text.startswith("nats: "):
        text = text[len("nats: "):].strip("'")
    return text or type(exc).__name__


def _redacted(urls: list[str]) -> str:
    return ", ".join(redact(u) for u in urls)


class CredentialsRefused(NatsError):
    """The server refused the configured credentials ``connect_retries + 1`` times in a row."""


class Connection:
    """One client, connecting in the background until it works (see the module docstring)."""

    def __init__(self, cfg: NatsConfig, urls: list[str], name: str, state: LinkState) -> None:
        self.cfg = cfg
        self.urls = urls
        self.state = state
        state.urls = _redacted(urls)
        self.nc = Client()
        self.failures = 0  # failed attempts before the first connection
        self.refused = 0  # credentials refused in a row
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._name = name
        self._error: BaseException | None = None
        self.outage = 0.0  # seconds from the first failed attempt to the first connection

    def _options(self) -> dict[str, object]:
        cfg, state = self.cfg, self.state

        async def disconnected() -> None:
            if state.connected and not state.closing:
                log.warning("disconnected from NATS")
                state.down_since = time.monotonic()
            state.connected = False

        async def reconnected() -> None:
            state.connected = True
            state.last_error = None
            since = state.down_since
            state.down_since = None
            if since is not None:
                log.info("reconnected to NATS after %.1f s", time.monotonic() - since)
            else:
                log.info("reconnected to NATS")
            for cb in state.on_reconnect:
                await cb()

        async def error_cb(exc: Exception) -> None:
            self._failed(exc)

        options: dict[str, object] = {
            "servers": self.urls,
            "name": self._name,
            # nats-py retries with no pause at all when this is 0: keep a floor, so a node whose
            # server is gone waits instead of spinning a core.
            "reconnect_time_wait": max(cfg.reconnect_wait_seconds, MIN_RECONNECT_WAIT),
            # Also the first connection: a server that is down at start is retried until it is
            # back (the node starts without it meanwhile, see Node.start).
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "connect_timeout": CONNECT_TIMEOUT,
            "disconnected_cb": disconnected,
            "reconnected_cb": reconnected,
            "error_cb": error_cb,
            "tls": _tls_context(cfg),
            # First URL first, also on reconnects (see docs/jetstream-cluster.md).
            "dont_randomize": not cfg.randomize_urls,
        }
        if cfg.user_name:
            options["user"] = cfg.user_name
            options["password"] = cfg.user_password
        if cfg.seed_file:
            options["nkeys_seed"] = cfg.seed_file
        return options

    def _failed(self, exc: BaseException) -> None:
        """nats-py's error callback: an attempt to connect failed (or a live link had trouble,
        which nats-py handles itself)."""
        if self.state.connected:
            log.debug("NATS client error: %s", describe_connect_error(exc))
            return
        refused = credentials_refused(exc)
        if not refused and self.refused and isinstance(exc, ConnectionResetError):
            # The server closes the connection right after refusing the credentials: the
            # refusal is the reason, not the reset.
            return
        self.refused = self.refused + 1 if refused else 0
        self.state.last_error = describe_connect_error(exc)
        if self.state.down_since is None:
            self.state.down_since = time.monotonic()
        self.failures += 1
        log.debug("NATS connection attempt failed: %s", self.state.last_error)
        self._changed.set()

    def start(self) -> None:
        """Begin connecting (in the background, until it works or :meth:`close`)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        try:
            await self.nc.connect(**self._options())  # type: ignore[arg-type]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # e.g. a seed file that cannot be read: retrying cannot help
            self._error = exc
            self.state.last_error = describe_connect_error(exc)
            self._changed.set()
            return
        since, self.state.down_since = self.state.down_since, None
        self.outage = 0.0 if since is None else time.monotonic() - since
        self.state.connected = True
        self.state.last_error = None
        self.refused = 0
        self._changed.set()

    @property
    def connected(self) -> bool:
        return self.state.connected and self.nc.is_connected

    async def wait(self, stop: asyncio.Event | None = None, attempts: int | None = None) -> bool:
        """Wait until connected (True), ``attempts`` attempts have failed or ``stop`` is set
        (False). Raises :class:`CredentialsRefused` when the server refused the credentials
        ``connect_retries + 1`` times in a row, and :class:`NatsError` when connecting cannot
        go on (bad options)."""
        self.start()
        while True:
            self._changed.clear()
            if self._task is not None and self._task.done() and not self.connected:
                raise NatsError(f"cannot connect to NATS at {self.state.urls}: "
                                f"{self.state.last_error}") from self._error
            if self.connected:
                return True
            if self.refused > self.cfg.connect_retries:
                raise CredentialsRefused(
                    f"cannot connect to NATS at {self.state.urls}: {self.state.last_error}; "
                    "fix nats.user_name/user_password (or seed_file) and restart the node")
            if attempts is not None and self.failures >= attempts:
                return False
            if stop is not None and stop.is_set():
                return False
            events = [self._changed] if stop is None else [self._changed, stop]
            await wait_any(*events)

    async def close(self) -> None:
        """Stop connecting (if still at it) and close the client."""
        self.state.closing = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        try:
            await asyncio.wait_for(self.nc.close(), 5.0)
        except Exception as exc:  # the server may already be gone; nothing is lost here
            log.debug("closing the NATS connection: %s", exc)


async def connect(cfg: NatsConfig, urls: list[str], name: str, state: LinkState) -> Client:
    """Connect, trying ``connect_retries`` more times; once connected, reconnect forever.

    For commands: when NATS cannot be reached after those attempts, raise :class:`NatsError`
    with the reason (the node itself starts without NATS instead, see ``Node.start``).
    """
    conn = Connection(cfg, urls, name, state)
    try:
        if await conn.wait(attempts=cfg.connect_retries + 1):
            return conn.nc
    except BaseException:
        await conn.close()
        raise
    await conn.close()
    raise NatsError(f"cannot connect to NATS at {state.urls} ({conn.failures} attempts): "
                    f"{state.last_error}")
