"""A node joining the cluster with a database of its own.

"Of its own": the database file exists, there is no sequence map, the database records no
position on any of the cluster's streams (it never ran harmonylite here, or ran an unrelated
cluster), and its replicated tables hold rows. Restoring the cluster's snapshot over it would
replace those rows, so it never happens silently; ``snapshot.join`` (or ``-join``) says what to do:

- ``refuse`` (the default): unless the newest sound snapshot holds every row of the database as
  it is (nodes that all started with the same data: nothing would be lost, the node is
  provisioned as before), the node stops (exit 2) before anything touches the file, naming the
  database, the rows per table the snapshot lacks, the snapshot and the choices;
- ``replace``: a consistent copy of the file is kept beside it
  (``<db>.before-join-YYYYmmddTHHMMSSZ``, SQLite's backup API), then the snapshot is installed;
- ``merge``: the same copy, the snapshot installed, then the copy's rows are written into the
  database by the node's own connection, through the capture triggers: they are this node's
  local changes, published like any other, and applied after the snapshot's rows on every node
  (so where a key is in both, the joiner's row wins). A marker file (``<db>.join-merge``) naming
  the copy makes the merge survive a crash between the install and its commit.

A database with rows of its own and no snapshot in the store is not replaced: it keeps its rows
and replays the streams, as before. Rows written without capture are not published; with
``merge`` they are (each row is written again through the triggers).

Called by the node: :func:`check` before anything opens the database for writing,
:func:`decide` and :func:`before_install` by the recovery, :func:`finish` once capture is
installed. Reading and writing the rows is :mod:`harmonylite.restore.join_rows`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.config import Config
from harmonylite.db.connection import DbThread, plain_connection
from harmonylite.errors import HarmonyliteError, JoinRefused, SnapshotError, StorageError
from harmonylite.restore.db_file import remove_durably
from harmonylite.restore.join_rows import (
    OwnData,
    lacking_rows,
    merge_rows,
    own_data,
    republish,
    rows_text,
)
from harmonylite.restore.loop import list_patiently, patiently
from harmonylite.restore.verify import fetch, work_dir
from harmonylite.snapshot.manifest import Manifest
from harmonylite.snapshot.progress import NullProgress
from harmonylite.storage import ObjectStore, open_store

log = logging.getLogger(__name__)

MARKER_SUFFIX = ".join-merge"
COPY_INFIX = ".before-join-"


@dataclass
class Joining:
    """What :func:`check` found at start, and what the recovery did about it."""

    own: OwnData
    mode: str
    copy: Path | None = None


def marker_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + MARKER_SUFFIX)


def refusal(db_path: Path, own: OwnData, snapshot_id: str) -> str:
    return (
        f"refusing to start: database {db_path} holds rows of its own ({own}) and no position "
        f"on the cluster's streams, and installing the cluster's snapshot {snapshot_id} would "
        f"replace them. Choose one: join = \"replace\" in [snapshot] (or -join replace) "
        "installs the snapshot, keeping a copy of this file beside it; join = \"merge\" (or "
        "-join merge) installs the snapshot, then publishes this file's rows as this node's own "
        "changes (its row wins where a key is in both), keeping a copy too; or move the file "
        "away to start from the snapshot alone. Nothing was changed: the database was left "
        "untouched")


async def check(cfg: Config, js: JetStreamContext, db_path: Path,
                seq_map_path: Path) -> Joining | None:
    """At start, before the database is opened for writing: find rows of its own; when the
    store holds a snapshot that lacks some of them and the operator chose nothing, refuse
    (JoinRefused)."""
    own = await asyncio.to_thread(own_data, cfg, db_path, seq_map_path)
    if own is None:
        return None
    # The database was not replaced yet: a merge left over from an earlier try has no object.
    await asyncio.to_thread(remove_durably, marker_path(db_path))
    joining: Joining | None = Joining(own, cfg.snapshot.join)
    try:
        store = await patiently(lambda: open_store(cfg.snapshot, js=js,
                                                   bucket=namespace(cfg).snapshot_bucket))
    except StorageError as exc:
        log.warning("cannot open the snapshot store to check whether %s would be replaced: %s",
                    db_path, exc)
        return joining
    try:
        try:
            candidates = await list_patiently(store)
        except StorageError as exc:
            # The recovery lists again and calls decide() before installing anything.
            log.warning("cannot list snapshots to check whether %s would be replaced: %s",
                        db_path, exc)
            candidates = []
        if candidates and joining is not None:
            joining = await decide(cfg, store, candidates, db_path, joining)
    finally:
        await store.aclose()
    if candidates and joining is not None:
        log.warning("database %s holds rows of its own (%s); snapshot.join = %s: %s",
                    db_path, own, joining.mode,
                    "it is replaced by the cluster's snapshot, a copy kept"
                    if joining.mode == "replace" else "its rows are merged into the cluster's "
                    "snapshot", extra={"path": str(db_path), "rows": own.total})
    return joining


async def decide(cfg: Config, store: ObjectStore, candidates: list[Manifest], db_path: Path,
                 joining: Joining) -> Joining | None:
    """Before a snapshot of ``candidates`` (newest first) is installed over a database of its
    own: go on as the operator chose; without a choice, go on (returning None: nothing of its
    own) only when the newest sound snapshot holds every row of the database as it is (nodes
    that all started with the same data), else refuse (JoinRefused)."""
    if joining.mode != "refuse":
        return joining
    lacking, snapshot_id = await _lacking(cfg, store, candidates, db_path, joining.own)
    if lacking is None:
        log.info("database %s holds only rows that snapshot %s holds too: nothing of its own is "
                 "replaced", db_path, snapshot_id, extra={"snapshot_id": snapshot_id})
        return None
    raise JoinRefused(refusal(db_path, lacking, snapshot_id))


async def _lacking(cfg: Config, store: ObjectStore, candidates: list[Manifest], db_path: Path,
                   own: OwnData) -> tuple[OwnData | None, str]:
    """The rows of ``own`` that the newest sound snapshot lacks or holds otherwise, and its id
    (every row, against the newest, when none can be read)."""
    work = work_dir(cfg.snapshot.temp_dir or None)
    try:
        for m in candidates:
            path = work / f"{m.id}.db"
            try:
                await fetch(store, m, path, work, NullProgress(), integrity=False)
            except (SnapshotError, StorageError) as exc:
                log.warning("cannot compare %s with snapshot %s: %s", db_path, m.id, exc,
                            extra={"snapshot_id": m.id})
                continue
            return await asyncio.to_thread(lacking_rows, db_path, path, own), m.id
        return own, candidates[0].id
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


async def before_install(joining: Joining, db_path: Path) -> None:
    """Right before the snapshot is installed (a verified one is at hand): keep the copy, and
    for a merge the marker naming it (so a crash after the install still merges)."""
    if joining.copy is not None:
        return  # an install tried again
    joining.copy = await asyncio.to_thread(keep_copy, db_path)
    log.warning("kept a copy of %s before replacing it with the cluster's snapshot: %s",
                db_path, joining.copy, extra={"path": str(joining.copy)})
    if joining.mode == "merge":
        await asyncio.to_thread(_write_marker, marker_path(db_path), joining.copy)


def keep_copy(db_path: Path) -> Path:
    """A consistent copy of ``db_path`` beside it, with SQLite's backup API (fsynced, then
    renamed into place: a copy that exists is whole)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    copy = db_path.with_name(f"{db_path.name}{COPY_INFIX}{stamp}")
    n = 1
    while copy.exists():
        n += 1
        copy = db_path.with_name(f"{db_path.name}{COPY_INFIX}{stamp}-{n}")
    tmp = copy.with_name(f".{copy.name}.tmp")
    src = plain_connection(db_path)
    try:
        src.execute("PRAGMA busy_timeout = 10000")
        dest = plain_connection(tmp)
        try:
            src.backup(dest)
            dest.execute("PRAGMA journal_mode = DELETE")  # one standalone file
        finally:
            dest.close()
    finally:
        src.close()
    _fsync(tmp)
    os.replace(tmp, copy)
    _fsync(copy.parent)
    return copy


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_marker(marker: Path, copy: Path) -> None:
    tmp = marker.with_name(f".{marker.name}.tmp")
    tmp.write_text(json.dumps({"copy": str(copy)}))
    _fsync(tmp)
    os.replace(tmp, marker)
    _fsync(marker.parent)


def _read_marker(marker: Path) -> Path | None:
    try:
        return Path(str(json.loads(marker.read_text())["copy"]))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise HarmonyliteError(f"{marker} is not a merge marker ({exc!r}): it should name the "
                               "copy whose rows are to be merged into the database") from exc


async def finish(joining: Joining | None, cfg: Config, db_path: Path, writer: DbThread,
                 restored: str | None) -> None:
    """Once capture is installed: merge what a merge left to do (the marker's copy into the
    restored database, or a database that kept its rows republished in place), or say that a
    database kept its rows without publishing them."""
    copy = await asyncio.to_thread(_read_marker, marker_path(db_path))
    if copy is not None:
        if not copy.exists():
            raise HarmonyliteError(f"cannot merge the rows of {copy} into {db_path}: the copy is "
                                   f"gone; remove {marker_path(db_path)} to start without them")
        merged = await writer.call(lambda c: merge_rows(c, copy, cfg))
        await asyncio.to_thread(remove_durably, marker_path(db_path))
        log.warning("merged %s from %s into %s as this node's own changes", rows_text(merged), copy,
                    db_path, extra={"path": str(copy), "rows": merged})
        return
    if joining is None or restored is not None:
        return
    if joining.mode == "merge":
        merged = await writer.call(lambda c: republish(c, joining.own))
        log.warning("merged %s of %s (%s) into the cluster as this node's own changes",
                    rows_text(merged), db_path, joining.own, extra={"rows": merged})
    else:
        log.warning("database %s keeps its %s (%s), no snapshot installed, and replays the "
                    "streams; those rows are not published (right when every node started with "
                    "the same data; join = \"merge\" publishes them)", db_path,
                    rows_text(joining.own.total), joining.own, extra={"rows": joining.own.total})


