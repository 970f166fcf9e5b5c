"""age X25519 keys for sealing snapshots at rest: reading and checking them.

Recipients (``age1…``, public) come from ``[snapshot.encryption] recipients``; identities
(``AGE-SECRET-KEY-1…``, secret) from the file ``identity_file`` names, in the format
``age-keygen`` writes (one identity a line, ``#`` comments). Errors name the configuration key
and what is wrong, never a secret key's text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyrage

from harmonylite.errors import ConfigError

log = logging.getLogger(__name__)

RECIPIENTS_KEY = "snapshot.encryption.recipients"
IDENTITY_FILE_KEY = "snapshot.encryption.identity_file"
RECIPIENT_PREFIX = "age1"
SECRET_PREFIX = "AGE-SECRET-KEY-"
HIDDEN = "<a secret key, not shown>"


@dataclass(frozen=True)
class Keys:
    """What a node seals with (public keys) and opens with (secret identities)."""

    recipients: tuple[str, ...] = ()
    identities: tuple[Any, ...] = ()  # pyrage.x25519.Identity
    identity_file: str = ""

    def sealers(self) -> list[Any]:
        return [pyrage.x25519.Recipient.from_str(r) for r in self.recipients]


def check_recipients(values: list[str]) -> tuple[str, ...]:
    """The recipients in order, duplicates dropped; ConfigError naming the first bad one."""
    out: list[str] = []
    for n, raw in enumerate(values, start=1):
        text = raw.strip()
        if text.upper().startswith(SECRET_PREFIX):
            raise ConfigError(RECIPIENTS_KEY, HIDDEN,
                              f"entry {n} is a secret identity: list its public key (age1…) "
                              "here and keep the identity in identity_file")
        if not text.startswith(RECIPIENT_PREFIX):
            raise ConfigError(RECIPIENTS_KEY, raw, f"entry {n} is not an age X25519 recipient: "
                              "it must start with age1")
        try:
            pyrage.x25519.Recipient.from_str(text)
        except pyrage.RecipientError as exc:
            raise ConfigError(RECIPIENTS_KEY, raw, f"entry {n} is not an age X25519 recipient: "
                              f"{exc}") from None
        if text not in out:
            out.append(text)
    return tuple(out)


def load_identities(path: str) -> tuple[Any, ...]:
    """The identities in ``path`` (at least one); ConfigError naming the file and line."""
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
        mode = file.stat().st_mode
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(IDENTITY_FILE_KEY, path, f"cannot be read: {exc}") from None
    if mode & 0o077:
        log.warning("the age identity file %s can be read by other users (mode %03o): "
                    "chmod 600 it", path, mode & 0o777)
    found: list[Any] = []
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            found.append(pyrage.x25519.Identity.from_str(line))
        except pyrage.IdentityError:
            what = "a public key: the file holds secret identities" \
                if line.startswith(RECIPIENT_PREFIX) else "not an age X25519 identity"
            raise ConfigError(IDENTITY_FILE_KEY, path,
                              f"line {n} is {what} (AGE-SECRET-KEY-1…)") from None
    if not found:
        raise ConfigError(IDENTITY_FILE_KEY, path, "holds no identity (AGE-SECRET-KEY-1…)")
    return tuple(found)


def load_keys(recipients: list[str], identity_file: str) -> Keys:
    return Keys(check_recipients(recipients),
                load_identities(identity_file) if identity_file else (), identity_file)


def new_identity() -> tuple[str, str]:
    """A fresh (secret identity, public recipient) pair, as ``age-keygen`` makes."""
    identity = pyrage.x25519.Identity.generate()
    return str(identity), str(identity.to_public())
