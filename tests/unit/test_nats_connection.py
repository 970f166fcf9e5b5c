"""Failed NATS connection attempts described in words (never an empty reason)."""

from __future__ import annotations

import socket
import ssl

import pytest
from nats.errors import AuthorizationError, NoServersError
from nats.errors import Error as NatsClientError

from harmonylite.bus.connection import (
    LinkState,
    credentials_refused,
    describe_connect_error,
)


@pytest.mark.parametrize(("exc", "words"), [
    (ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)"), "connection refused"),
    (TimeoutError(), "no answer within 5 s"),
    (socket.gaierror(-2, "Name or service not known"), "name or service not known"),
    (OSError(113, "Connect call failed"), "no route to host"),
    (NatsClientError("nats: 'Authorization Violation'"),
     "the server refused this node's credentials (authorization violation)"),
    (AuthorizationError(), "the server refused this node's credentials (authorization violation)"),
    (NoServersError(), "no servers available for connection"),
    (ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
                                     "failed"), "TLS failed"),
    (RuntimeError(), "RuntimeError"),
])
def test_every_failure_has_words(exc: BaseException, words: str) -> None:
    text = describe_connect_error(exc)
    assert text.startswith(words), text
    assert text.strip()


def test_credentials_refused_is_told_apart() -> None:
    assert credentials_refused(NatsClientError("nats: 'Authorization Violation'"))
    assert credentials_refused(AuthorizationError())
    assert not credentials_refused(ConnectionRefusedError(111, "x"))
    assert not credentials_refused(NatsClientError("nats: unexpected EOF"))


def test_reason_names_the_servers() -> None:
    state = LinkState(urls="nats://a:4222, nats://b:4222")
    assert state.reason() == "NATS is disconnected"
    state.last_error = "connection refused"
    assert state.reason() == "NATS unreachable at nats://a:4222, nats://b:4222: connection refused"
