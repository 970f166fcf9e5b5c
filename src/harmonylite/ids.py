"""64-bit row ids that do not collide across nodes, for tables every node inserts into.

An auto-increment key is chosen by each node's SQLite alone, so two nodes inserting at the same
moment pick the same id and one row displaces the other when they replicate. These ids carry the
generator's identity instead, like Twitter's Snowflake ids::

    bit 63      always 0 (the id is a positive signed 64-bit integer: SQLite's INTEGER,
                Django's BigAutoField, SQLAlchemy's BigInteger all take it)
    bits 22..62 milliseconds since EPOCH_MS (2024-01-01T00:00:00Z): 41 bits, until year 2093
    bits 12..21 generator id (0..1023)
    bits 0..11  counter within the millisecond (4096 ids per millisecond per generator)

Ids from one generator strictly increase. Ids from different generators are ordered by their
millisecond, so "ORDER BY id" is roughly creation order across the cluster.

Two processes must never share a generator id while both write: see ``generator_id()`` for where
it comes from by default, and ``docs/frameworks.md`` for processes with several workers.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

EPOCH_MS = 1_704_067_200_000  # 2024-01-01T00:00:00Z
TIME_BITS = 41
GENERATOR_BITS = 10
COUNTER_BITS = 12
MAX_GENERATOR = (1 << GENERATOR_BITS) - 1
MAX_COUNTER = (1 << COUNTER_BITS) - 1
MAX_TIME = (1 << TIME_BITS) - 1

ENV_GENERATOR = "HARMONYLITE_ID_GENERATOR"
ENV_NODE_ID = "HARMONYLITE_NODE_ID"
ENV_CONFIG = "HARMONYLITE_CONFIG"


def fold_node_id(node_id: int) -> int:
    """A node id (unsigned 64-bit) as a 10-bit generator id.

    Ids 0..1023 are kept as they are, so a cluster numbered 1, 2, 3… gets distinct generators for
    certain. Larger ids (HarmonyLite's default is a hash of the machine id) are XOR-folded: two
    such nodes share a generator id with a probability of 1 in 1024, which is why the guide asks
    for small node ids or an explicit ``HARMONYLITE_ID_GENERATOR``.
    """
    if node_id < 0 or node_id >= 1 << 64:
        raise ValueError(f"node id {node_id} is outside the unsigned 64-bit range")
    if node_id <= MAX_GENERATOR:
        return node_id
    folded = 0
    while node_id:
        folded ^= node_id & MAX_GENERATOR
        node_id >>= GENERATOR_BITS
    return folded


def _env_int(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


def generator_id() -> int:
    """The generator id of this process, from the first of:

    1. ``HARMONYLITE_ID_GENERATOR`` (0..1023), used as it is: one per writing process;
    2. ``HARMONYLITE_NODE_ID``, folded (see :func:`fold_node_id`);
    3. ``node_id`` of the harmonylite configuration file named by ``HARMONYLITE_CONFIG``, folded
       (the node's own id, machine-id derived when the file does not set it, as the node does).

    Without any of them there is no safe choice, so this raises rather than guess.
    """
    explicit = _env_int(ENV_GENERATOR)
    if explicit is not None:
        if not 0 <= explicit <= MAX_GENERATOR:
            raise ValueError(f"{ENV_GENERATOR}={explicit} must be between 0 and {MAX_GENERATOR}")
        return explicit
    node = _env_int(ENV_NODE_ID)
    if node is not None:
        return fold_node_id(node)
    config_path = os.environ.get(ENV_CONFIG, "").strip()
    if config_path:
        # Imported here: the application process needs the configuration module only in this case.
        from harmonylite.config import load_config

        cfg, _warnings = load_config(config_path)
        return fold_node_id(cfg.node_id)
    raise LookupError(
        f"no generator id for harmonylite ids: set {ENV_GENERATOR} (0..{MAX_GENERATOR}, one per "
        f"writing process), {ENV_NODE_ID}, or {ENV_CONFIG} (the node's config.toml), or call "
        "harmonylite.ids.configure(generator)"
    )


class IdGenerator:
    """Thread-safe generator of ids for one generator id."""

    def __init__(self, generator: int, *, clock_ms: Callable[[], int] | None = None) -> None:
        if not 0 <= generator <= MAX_GENERATOR:
            raise ValueError(f"generator id {generator} must be between 0 and {MAX_GENERATOR}")
        self.generator = generator
        self._clock = clock_ms or _now_ms
        self._lock = threading.Lock()
        self._last_ms = -1
        self._counter = 0

    def next_id(self) -> int:
        with self._lock:
            now = int(self._clock()) - EPOCH_MS
            # A clock stepped backwards (NTP) keeps the last millisecond instead of going back:
            # going back could reissue an id already handed out by this generator.
            if now > self._last_ms:
                self._last_ms, self._counter = now, 0
            elif self._counter < MAX_COUNTER:
                self._counter += 1
            else:
                # 4096 ids in one millisecond: borrow the next one rather than wait; the clock
                # catches up within milliseconds.
                self._last_ms, self._counter = self._last_ms + 1, 0
            if not 0 <= self._last_ms <= MAX_TIME:
                raise OverflowError(f"clock {self._last_ms} ms after the id epoch is out of range")
            return (self._last_ms << (GENERATOR_BITS + COUNTER_BITS)) | (
                self.generator << COUNTER_BITS) | self._counter


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True)
class IdParts:
    ms: int  # milliseconds since EPOCH_MS
    generator: int
    counter: int

    @property
    def created_at(self) -> datetime:
        return datetime.fromtimestamp((self.ms + EPOCH_MS) / 1000, UTC)


def parse(value: int) -> IdParts:
    """The fields of an id made by :class:`IdGenerator`."""
    if not 0 <= value < 1 << 63:
        raise ValueError(f"{value} is not a positive signed 64-bit id")
    return IdParts(ms=value >> (GENERATOR_BITS + COUNTER_BITS),
                   generator=(value >> COUNTER_BITS) & MAX_GENERATOR,
                   counter=value & MAX_COUNTER)


_default: IdGenerator | None = None
_default_lock = threading.Lock()


def configure(generator: int) -> IdGenerator:
    """Set this process's generator id explicitly (e.g. in a worker's post-fork hook)."""
    global _default
    with _default_lock:
        _default = IdGenerator(generator)
        return _default


def default_generator() -> IdGenerator:
    global _default
    with _default_lock:
        if _default is None:
            _default = IdGenerator(generator_id())
        return _default


def next_id() -> int:
    """A new id from this process's generator: the ``default=`` callable for ORMs."""
    return default_generator().next_id()


def _forget_after_fork() -> None:
    # A forked child would otherwise continue the parent's generator with the same generator id
    # and counter and hand out the ids the parent hands out; it must choose again (from its own
    # environment or configure()).
    global _default, _default_lock
    _default = None
    _default_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
