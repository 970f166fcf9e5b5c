"""The per-backend description the contract fixtures build, and shared assertions."""

from __future__ import annotations

import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from harmonylite.storage import ObjectStore

S3_BUCKET = "harmonylite-contract"  # created once per session on SeaweedFS

Opener = Callable[[], Awaitable[ObjectStore]]


@dataclass
class Backend:
    """How to open a store of one kind, and the variations the contract cases need."""

    name: str
    open: Opener
    # A store whose credentials are refused, with the secret it carries; None: not applicable.
    bad_credentials: tuple[Opener, str] | None = None
    skip_auth_reason: str = ""
    # A store whose server is down, with the secret it carries.
    stopped: tuple[Opener, str] | None = None
    # False when the server replaces an object by deleting it first (wsgidav's MOVE with
    # Overwrite: T): during an overwrite a reader may briefly find no object, never a partial one.
    atomic_overwrite: bool = True
    cleanup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)


def assert_no_secret(exc: BaseException, secret: str) -> None:
    """The secret appears nowhere in the error, its message, repr or chained causes."""
    text = "".join(traceback.format_exception(exc))
    assert secret not in text, f"secret leaked into the error: {text}"
