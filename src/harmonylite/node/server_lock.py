"""One embedded nats-server per JetStream store, guaranteed by two ``fcntl.flock`` locks.

Two nats-servers on one JetStream directory corrupt it, and a process that stops a server another
process is using cuts that process off mid-upload. Beside the store directory ``S`` live:

- ``S.owner.lock``: held exclusively, for the server's whole life, by the process that runs the
  server (a node, or a CLI command when no node runs). The holder writes into it who it is and,
  once the server accepts connections, the server's client URL and pid, so others can use it.
- ``S.users.lock``: held shared by every other process using the server (CLI commands), and
  taken exclusively by the owner before it stops the server: the owner waits until the last
  user is done.

A CLI command takes ``users`` shared, then tries ``owner``: it either starts the server itself or
uses the owner's. A node needs the server for as long as it runs, so it must own it: when a
command owns it, the node waits for that command to finish; when another node owns it, the node
refuses. ``flock`` locks belong to the open file, so a process that dies (even by SIGKILL)
releases them, and the server child (spawned with ``close_fds``) never inherits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from harmonylite.errors import NatsError

log = logging.getLogger(__name__)

# How often a process waiting on a lock held by another process looks again (flock has no
# asynchronous wait, and a thread blocked in flock(2) cannot be cancelled).
POLL = 0.05


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process: alive
    return True


def runs_on(pid: int, path: Path) -> bool:
    """Whether process ``pid`` is alive and names ``path`` on its command line (a pid reused by
    an unrelated process does not)."""
    try:
        return str(path).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class StoreLock:
    """The locks of one JetStream store directory (see the module docstring)."""

    def __init__(self, store_dir: Path) -> None:
        self.store_dir = store_dir
        self.owner_path = store_dir.with_name(store_dir.name + ".owner.lock")
        self.users_path = store_dir.with_name(store_dir.name + ".users.lock")
        self._owner_fd: int | None = None
        self._users_fd: int | None = None

    @property
    def owned(self) -> bool:
        return self._owner_fd is not None

    # --- owning ----------------------------------------------------------------------------
    def try_own(self, role: str) -> dict[str, Any] | None:
        """Take the owner lock if nobody holds it; returns what the previous owner left (its
        server may still be shutting down), or None when another process owns the store."""
        self.store_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.owner_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._owner_fd = fd
        previous = self.owner_info()
        self._write({"pid": os.getpid(), "role": role})
        return previous

    def publish(self, url: str, server_pid: int, role: str, workdir: str) -> None:
        """The server accepts connections at ``url``: tell the processes waiting to use it
        (``workdir``, on the server's command line, tells its pid from a reused one)."""
        self._write({"pid": os.getpid(), "role": role, "url": url, "server_pid": server_pid,
                     "workdir": workdir})

    def disown(self) -> None:
        fd, self._owner_fd = self._owner_fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)  # nobody may take a stopped server's URL for a live one
        finally:
            os.close(fd)  # closing releases the lock

    def _write(self, info: dict[str, Any]) -> None:
        assert self._owner_fd is not None
        data = json.dumps(info).encode()
        # Readers parse the whole file; a torn read fails to parse and they look again.
        os.ftruncate(self._owner_fd, 0)
        os.pwrite(self._owner_fd, data, 0)

    def owner_info(self) -> dict[str, Any]:
        """What the owner wrote: pid and role, then url and server_pid ({} while unreadable)."""
        try:
            info = json.loads(self.owner_path.read_bytes() or b"{}")
        except (OSError, ValueError):
            return {}
        return info if isinstance(info, dict) else {}

    # --- using another process's server ----------------------------------------------------
    async def share(self, timeout: float) -> None:
        """Take the users lock shared; it is held exclusively only while an owner stops its
        server, for as long as that takes."""
        self.store_dir.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.users_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            await _poll_flock(fd, fcntl.LOCK_SH, timeout,
                              f"the embedded NATS server on {self.store_dir} to stop")
        except BaseException:
            os.close(fd)
            raise
        self._users_fd = fd

    def unshare(self) -> None:
        fd, self._users_fd = self._users_fd, None
        if fd is not None:
            os.close(fd)

    async def wait_for_users(self) -> None:
        """Before the owner stops its server: wait until no other process uses it (the users
        lock taken exclusively, kept until :meth:`unshare`). No bound: stopping it under a
        command would cut that command off mid-way."""
        if self._users_fd is None:
            self.store_dir.parent.mkdir(parents=True, exist_ok=True)
            self._users_fd = os.open(self.users_path, os.O_RDWR | os.O_CREAT, 0o644)
        fd = self._users_fd
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            log.info("waiting for the commands using the embedded NATS server on %s to finish "
                     "before stopping it", self.store_dir)
        await _poll_flock(fd, fcntl.LOCK_EX, None, "")


async def _poll_flock(fd: int, kind: int, timeout: float | None, what: str) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, kind | fcntl.LOCK_NB)
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise NatsError(f"waited {timeout:.0f} s for {what}")
        await asyncio.sleep(POLL)
