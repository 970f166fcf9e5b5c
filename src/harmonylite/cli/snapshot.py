"""`harmonylite snapshot VERB`: save, list, verify and restore snapshots.

Exit codes: 0 success; 1 failure at run time (a verification failure names its check); 2 bad
usage; 75 when a capture is already running (``system busy capturing snapshot``). Progress goes to
stderr (a bar on a terminal, plain lines otherwise); stdout carries only the answer (an id, the
listing, a path), so scripts can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from harmonylite.bus.names import namespace
from harmonylite.cli import point_in_time
from harmonylite.cli.parsing import Commands, add_command, add_verbs, command_tree, parse
from harmonylite.config import Config
from harmonylite.errors import (
    ConfigError,
    HarmonyliteError,
    SnapshotBusy,
    UsageError,
    VerificationError,
)
from harmonylite.redact import redact
from harmonylite.restore.verify import restore_to_path, verify_snapshot
from harmonylite.snapshot.manifest import Manifest, find_snapshot, list_snapshots
from harmonylite.snapshot.pipeline import SnapshotPipeline
from harmonylite.snapshot.progress import Progress
from harmonylite.storage import ObjectStore, open_store

if TYPE_CHECKING:
    # A command on an S3, SFTP, WebDAV or file store never touches NATS: the client library
    # (and aiohttp under it) is imported only when a command connects, which saves a restore
    # or a listing a good part of its start-up.
    from contextlib import AbstractAsyncContextManager

    from nats.js import JetStreamContext

    from harmonylite.bus.connection import JsContext

log = logging.getLogger(__name__)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_BUSY = 0, 1, 2, 75

# Yields a connected JetStream context for the nats store, and disconnects on exit.


def add_parser(commands: Commands) -> None:
    p = add_command(commands, "snapshot", summary="take, list, verify and restore snapshots",
                    description="Take, list, verify and restore snapshots.", handler=main)
    verbs = add_verbs(p)
    verbs.add_parser("save", help="take one snapshot now, upload, verify, commit, print its id")
    ls = verbs.add_parser("list", help="committed snapshots, newest first")
    ls.add_argument("-json", "--json", action="store_true", help="print a JSON array of manifests")
    ver = verbs.add_parser("verify", help="download a snapshot and check size, SHA-256, integrity")
    ver.add_argument("id", nargs="?", default="latest", metavar="ID|latest",
                     help="a snapshot id, or latest (the default): the newest")
    res = verbs.add_parser("restore", help="download, verify and write a snapshot's database")
    res.add_argument("id", nargs="?", default="latest", metavar="ID|latest",
                     help="a snapshot id (that one only), or latest (the default): the newest "
                     "sound one, falling back to older ones")
    res.add_argument("-output", "--output", "-o", default=None, metavar="PATH",
                     help="write the restored database here (must not exist); nothing else is "
                     "touched. Without it: replace this node's db_path (the node must be stopped)")
    res.add_argument("-integrity-check", "--integrity-check", action="store_true",
                     help="with --output: run PRAGMA integrity_check on the result as well (the "
                     "size and SHA-256 checks already prove it is the file that passed "
                     "integrity_check when the snapshot was taken)")
    point_in_time.add_arguments(res)
    res.add_argument("-force", "--force", action="store_true",
                     help="without --output: restore even when pending local changes cannot be "
                     "published first (they are lost)")


def default_js_context(cfg: Config) -> AbstractAsyncContextManager[JetStreamContext]:
    from harmonylite.cli.connecting import default_js_context as connect

    return connect(cfg)


@asynccontextmanager
async def snapshot_store(cfg: Config, js_context: JsContext | None = None
                         ) -> AsyncIterator[ObjectStore]:
    """The configured snapshot store, closed (and NATS disconnected) on exit."""
    if cfg.snapshot.store != "nats":
        store = await open_store(cfg.snapshot)
        try:
            yield store
        finally:
            await store.aclose()
        return
    ctx = js_context() if js_context is not None else default_js_context(cfg)
    async with ctx as js:
        store = await open_store(cfg.snapshot, js=js, bucket=namespace(cfg).snapshot_bucket)
        try:
            yield store
        finally:
            await store.aclose()


def _sequences_text(seqs: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(seqs.items())) or "-"


def format_listing(manifests: Sequence[Manifest]) -> str:
    rows = [("ID", "CREATED_AT", "NODE_ID", "DB_BYTES", "STORED_BYTES", "SEQUENCES")]
    rows += [(m.id, m.created_at, str(m.node_id), str(m.db_bytes), str(m.stored_bytes),
              _sequences_text(m.sequences)) for m in manifests]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] + "\n"
        for r in rows
    )


async def _dispatch(cfg: Config, args: argparse.Namespace, js_context: JsContext | None,
                    out: TextIO, err: TextIO) -> int:
    if args.verb == "restore" and (target := point_in_time.target_of(args)) is not None \
            and args.output is None:
        return await point_in_time.roll_back(cfg, target, args.force,
                                             lambda: snapshot_store(cfg, js_context),
                                             js_context or (lambda: default_js_context(cfg)),
                                             out, err)
    if args.verb == "restore" and args.output is None:
        return await _restore_db_path(cfg, args, js_context, out, err)
    if args.verb == "save" and not cfg.db_path:
        raise ConfigError("db_path", cfg.db_path, "is required to take a snapshot")
    progress = Progress(err)
    try:
        return await _verb(cfg, args, js_context, out, progress)
    finally:
        progress.end()


async def _restore_db_path(cfg: Config, args: argparse.Namespace, js_context: JsContext | None,
                           out: TextIO, err: TextIO) -> int:
    """The forced restore of this node's db_path (docs/recovery.md)."""
    from harmonylite.restore.forced import forced_restore

    if not cfg.db_path:
        raise ConfigError("db_path", cfg.db_path, "is required to restore without --output")
    progress = Progress(err)
    try:
        restored = await forced_restore(
            cfg, args.id, store_context=lambda: snapshot_store(cfg, js_context),
            js_context=js_context or (lambda: default_js_context(cfg)), force=args.force,
            progress=progress)
    finally:
        progress.end()
    out.write(f"{restored.manifest.id}\n")
    return EXIT_OK


@asynccontextmanager
async def _same_js(js: JetStreamContext) -> AsyncIterator[JetStreamContext]:
    yield js


async def _save(cfg: Config, js_context: JsContext | None, progress: Progress) -> str:
    """`snapshot save`: under the cluster's upload lock (key ``snapshot`` in its lease bucket), so
    it never overlaps the leader's snapshot; SnapshotBusy (exit 75) when the lock is held. With the
    embedded server, a non-NATS store and no node running here, there is no server to coordinate
    through: no lock."""
    from harmonylite.node.embedded_nats import EmbeddedNats

    local_node_down = not cfg.db_path or EmbeddedNats.running_url(Path(cfg.db_path)) is None
    if (cfg.snapshot.store != "nats" and not cfg.nats.urls and js_context is None
            and local_node_down):
        async with snapshot_store(cfg) as store:
            return (await SnapshotPipeline(cfg, store, progress=progress).save()).manifest.id
    from harmonylite.snapshot.upload_lock import upload_lock

    ctx = js_context() if js_context is not None else default_js_context(cfg)
    async with ctx as js, upload_lock(
            js, cfg.node_id, cfg.snapshot.leader_ttl, bucket=namespace(cfg).lease_bucket,
            replicas=cfg.replication_log.replicas,
            update_existing=cfg.replication_log.update_existing) as lock, \
            snapshot_store(cfg, lambda: _same_js(js)) as store:
        result = await SnapshotPipeline(cfg, store, progress=progress).save(fence=lock.confirm)
        return result.manifest.id


def describe_freshness(manifest: Manifest) -> str:
    """How far behind the stream heads a snapshot was captured (manifests before heads: unknown)."""
    if not manifest.heads:
        return "behind stream heads: unknown (manifest records no heads)"
    behind = manifest.behind
    parts = ", ".join(f"{s} {n}" for s, n in sorted(behind.items()))
    return f"behind stream heads: {max(behind.values(), default=0)} messages at most ({parts})"


async def _verb(cfg: Config, args: argparse.Namespace, js_context: JsContext | None,
                out: TextIO, progress: Progress) -> int:
    if args.verb == "save":
        out.write(await _save(cfg, js_context, progress) + "\n")
        return EXIT_OK
    async with snapshot_store(cfg, js_context) as store:
        if args.verb == "list":
            manifests = await list_snapshots(store)
            if args.json:
                out.write(json.dumps([m.to_dict() for m in manifests], indent=2) + "\n")
            else:
                out.write(format_listing(manifests))
                line = await point_in_time.window_line(cfg, store, manifests)
                if line is not None:
                    progress.finish(line)
        elif args.verb == "verify":
            manifest = await find_snapshot(store, args.id)
            await verify_snapshot(store, manifest, temp_dir=cfg.snapshot.temp_dir or None,
                                  progress=progress)
            out.write(f"{manifest.id} ok\n")
            # stdout carries only the answer; how fresh the snapshot was goes with the progress
            progress.finish(describe_freshness(manifest))
        elif (target := point_in_time.target_of(args)) is not None:
            await point_in_time.restore(cfg, store, target, Path(args.output), progress, out)
        else:
            manifest = await find_snapshot(store, args.id)
            path = await restore_to_path(store, manifest, Path(args.output),
                                         temp_dir=cfg.snapshot.temp_dir or None,
                                         progress=progress, integrity=args.integrity_check)
            out.write(f"{path}\n")
    return EXIT_OK


async def run(cfg: Config, argv: Sequence[str] | argparse.Namespace, *,
              js_context: JsContext | None = None, stdout: TextIO | None = None,
              stderr: TextIO | None = None) -> int:
    """Run one snapshot verb, given parsed or as its words (``["list", "--json"]``); returns the
    exit code (errors are printed, not raised)."""
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    try:
        args = argv if isinstance(argv, argparse.Namespace) \
            else parse(command_tree(add_parser), ["snapshot", *argv])
        return await _dispatch(cfg, args, js_context, out, err)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (UsageError, ConfigError) as exc:
        err.write(f"harmonylite: {redact(str(exc))}\n")
        return EXIT_USAGE
    except SnapshotBusy as exc:
        err.write(f"harmonylite: {redact(str(exc))}\n")
        return EXIT_BUSY
    except VerificationError as exc:
        err.write(f"harmonylite: verification failed: check {exc.check}: {redact(str(exc))}\n")
        return EXIT_FAILURE
    except (HarmonyliteError, OSError) as exc:
        err.write(f"harmonylite: {redact(str(exc))}\n")
        return EXIT_FAILURE


def main(cfg: Config, args: argparse.Namespace) -> int:
    """The handler in the command tree: runs :func:`run` on a fresh event loop."""
    return asyncio.run(run(cfg, args))
