"""This database's origin identity: the token its changes are published under.

Receivers drop a change whose origin already had a later change id applied (DESIGN rule 15), and
change ids are only unique within one database's history. A database copied to a second node (a
``cp`` of the file, a cloned VM image) carries the same change ids forward on both copies, so the
two copies must never publish under one origin. Every start of a node therefore takes a fresh
epoch (``node_id:epoch`` is the origin): whatever copies exist, each running process publishes
under a token no other process ever used. The epochs this database published under before are
kept (``own_origins``): its own changes coming back from the streams are recognised as already
here, whichever earlier start sent them (a copy inherits them too: it holds those rows).

Where the database lives (host, path, inode) is recorded as well, so a copy or a move is said
in the log when the node starts on it.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sqlite3
from pathlib import Path

from harmonylite.cdc import changelog, ddl
from harmonylite.db.connection import write_transaction

log = logging.getLogger(__name__)

EPOCH_BYTES = 8  # 64 random bits per start: two copies never draw the same epoch


def new_epoch() -> str:
    return secrets.token_hex(EPOCH_BYTES)


def home(db_path: Path, node_id: int) -> dict[str, object]:
    """Where the database file is: a copy or a move changes at least one of these."""
    st = os.stat(db_path)
    return {"host": socket.gethostname(), "path": str(db_path.resolve()),
            "dev": st.st_dev, "ino": st.st_ino, "node_id": node_id}


def _get(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute(f"SELECT v FROM {ddl.STATE} WHERE k = ?", (key,)).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def _put(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute(f"INSERT INTO {ddl.STATE}(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET "
                 "v = excluded.v", (key, value))


def own_origins(conn: sqlite3.Connection) -> dict[str, int | None]:
    """Every origin (``node_id:epoch``) this database published under, with the highest change
    id it may have sent under it (None: the current one, no bound yet)."""
    raw = _get(conn, "own_origins")
    return {str(o): None if b is None else int(b) for o, b in json.loads(raw).items()} \
        if raw else {}


def adopt(conn: sqlite3.Connection, node_id: int, epoch: str,
          db_path: Path | None = None) -> dict[str, int | None]:
    """Make ``epoch`` this database's current epoch (idempotent within one start) and return
    its own origins. ``db_path`` records where the database is and reports a copy or a move.

    The origins of earlier starts are bounded by the change ids sent so far: a copy made while
    the original ran inherits the original's epoch of that moment, and the original's later
    changes under it (ids above the bound) are the original's, not this database's."""
    with write_transaction(conn):
        previous = _get(conn, "epoch")
        origins = own_origins(conn)
        current = f"{node_id}:{epoch}"
        if previous and previous != epoch:
            sent = max(changelog.watermark(conn), changelog.intent(conn))
            # Databases from before the list was kept: the one epoch they had is theirs.
            origins.setdefault(f"{_get(conn, 'epoch_node') or node_id}:{previous}", sent)
            origins = {o: sent if b is None else b for o, b in origins.items()}
            if _get(conn, "publishing_epoch") is None:
                # A batch recorded before epochs were kept with it went out under that one.
                _put(conn, "publishing_epoch", previous)
        origins[current] = None
        _put(conn, "epoch", epoch)
        _put(conn, "epoch_node", str(node_id))
        _put(conn, "own_origins", json.dumps(origins, sort_keys=True))
        if db_path is not None:
            here = home(db_path, node_id)
            recorded = _get(conn, "home")
            was = json.loads(recorded) if recorded else None
            if was is not None and {k: was.get(k) for k in ("host", "path", "dev", "ino")} != \
                    {k: here[k] for k in ("host", "path", "dev", "ino")}:
                log.warning(
                    "database %s was copied or moved here from %s:%s (node %s): it publishes "
                    "its changes under an origin of its own (%s:%s), so no node takes them for "
                    "the original's", here["path"], was.get("host"), was.get("path"),
                    was.get("node_id"), node_id, epoch,
                    extra={"path": here["path"], "copied_from": was.get("path")})
            _put(conn, "home", json.dumps(here, sort_keys=True))
    return origins


def cut_floor(conn: sqlite3.Connection, cut: dict[str, int], first_sight: bool) -> int:
    """The highest change id this database had published (acknowledged) before the shard-count
    change whose cut is ``cut``: every one of them went out under the old count. Taken at the
    first start that finds the cut not yet passed (``first_sight``: before the publisher sends
    anything under the new count) and kept; 0 when it was never taken (nothing is assumed)."""
    key = json.dumps(cut, sort_keys=True)
    raw = _get(conn, "cut_floor")
    kept = json.loads(raw) if raw else {}
    if kept.get("cut") == key:
        return int(kept["floor"])
    if not first_sight:
        return 0
    floor = changelog.watermark(conn)
    with write_transaction(conn):
        _put(conn, "cut_floor", json.dumps({"cut": key, "floor": floor}, sort_keys=True))
    return floor
