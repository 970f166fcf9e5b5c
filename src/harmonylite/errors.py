"""Every error harmonylite raises on purpose derives from :class:`HarmonyliteError`.

Hierarchy::

    HarmonyliteError
    ├── ConfigError            bad key, type or value (CLI exit 2); carries key, value, allowed
    ├── UsageError             bad command line (CLI exit 2)
    ├── JoinRefused            a database with rows of its own would be replaced (CLI exit 2)
    ├── NatsError              NATS unreachable or a JetStream call failed
    ├── ChangeLogError         change capture cannot be installed or read
    ├── DecodeError            a stream message is not a harmonylite change batch
    ├── StorageError           a snapshot store failed; SDK errors are translated at its edge
    │   ├── ObjectNotFound     the key does not exist
    │   ├── StorageUnavailable the store cannot be reached or refused the operation
    │   ├── StorageAuthError   credentials refused
    │   └── SealedObjectDamaged a sealed object fails age's authentication (corrupt, truncated)
    ├── SealError              a sealed object this node has no identity for (names the object
    │                          and the recipients it was sealed to)
    └── SnapshotError          the snapshot pipeline failed
        ├── SnapshotBusy       a capture is running ("system busy capturing snapshot", exit 75)
        ├── NoSpaceError       the temp dir cannot hold the copy ("no space left on device")
        ├── LeaseLost          the snapshot lease was lost before the commit
        └── VerificationError  a stored snapshot failed a check (size, sha256, integrity_check)

Messages never contain credentials: backends redact URLs and secrets before raising.
"""

from __future__ import annotations


class HarmonyliteError(Exception):
    """Root of every error raised on purpose by harmonylite."""


class ConfigError(HarmonyliteError):
    def __init__(self, key: str, value: object, allowed: str) -> None:
        self.key = key
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid configuration {key} = {value!r}: {allowed}")


class UsageError(HarmonyliteError):
    pass


class JoinRefused(HarmonyliteError):
    """A node's database holds rows of its own that the cluster's snapshot would replace, and
    the operator has not chosen what to do (``snapshot.join`` / ``-join``)."""


class NatsError(HarmonyliteError):
    pass


class ChangeLogError(HarmonyliteError):
    pass


class DecodeError(HarmonyliteError):
    pass


class StorageError(HarmonyliteError):
    pass


class ObjectNotFound(StorageError):
    def __init__(self, key: str) -> None:
        self.key = key
        super().__init__(f"object not found: {key}")


class StorageUnavailable(StorageError):
    pass


class StorageAuthError(StorageError):
    pass


class SealedObjectDamaged(StorageError):
    def __init__(self, key: str, detail: str) -> None:
        self.key = key
        super().__init__(f"sealed object {key} is damaged: {detail}")


class SealError(HarmonyliteError):
    """A sealed (age-encrypted) object that none of this node's identities opens."""

    def __init__(self, key: str, recipients: list[str] | None, detail: str) -> None:
        self.key = key
        self.recipients = recipients
        to = ", ".join(recipients) if recipients else "recipients not recorded"
        super().__init__(f"{key} is sealed with age to {to}: {detail}")


class SnapshotError(HarmonyliteError):
    pass


BUSY_MESSAGE = "system busy capturing snapshot"


class SnapshotBusy(SnapshotError):
    def __init__(self, detail: str = "") -> None:
        super().__init__(BUSY_MESSAGE + (f": {detail}" if detail else ""))


class NoSpaceError(SnapshotError):
    def __init__(self, path: str, needed: int, free: int) -> None:
        self.path = path
        self.needed = needed
        self.free = free
        super().__init__(
            f"no space left on device: {path} needs {needed} bytes, {free} bytes free"
        )


class LeaseLost(SnapshotError):
    pass


class VerificationError(SnapshotError):
    def __init__(self, snapshot_id: str, check: str, detail: str) -> None:
        self.snapshot_id = snapshot_id
        self.check = check
        super().__init__(f"snapshot {snapshot_id} failed {check}: {detail}")
