"""`seq-map.cbor`: stream name -> last applied stream sequence, written atomically.

The authoritative copy of each position lives in the database (``__harmonylite__seq``, written in
the same transaction as the changes it covers). This file mirrors it for operators and tools, and
its absence is the seed's signal to check for a snapshot before replaying.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import cbor2

from harmonylite.errors import HarmonyliteError


def read_seq_map(path: Path) -> dict[str, int] | None:
    """The map, or None when the file does not exist."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        obj = cbor2.loads(data)
    except Exception as exc:  # cbor2 raises assorted types on garbage
        raise HarmonyliteError(f"{path} is not a valid sequence map: {exc}") from exc
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in obj.items()
    ):
        raise HarmonyliteError(f"{path} is not a map of stream name to sequence")
    return dict(obj)


def write_seq_map(path: Path, seqs: dict[str, int], *, durable: bool = False) -> None:
    """Replace the file atomically (temp file + rename); fsync when ``durable``."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(cbor2.dumps({k: int(v) for k, v in sorted(seqs.items())}))
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        with contextlib.suppress(OSError):
            os.fsync(fd)
        os.close(fd)
