"""What a node has applied of each stream: its positions (in the database, mirrored in the
seq-map file), the gaps the streams left it, and the counts health and the metrics report.

The consumers report each applied group here (:meth:`Progress.applied`) and each jump in
sequences (:meth:`Progress.gap_found`). A gap is recorded in the database and reported; with
snapshots on, the node is asked to start over (``restart``) so its start-up recovery restores a
snapshot that covers it (DESIGN rule 16).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from nats.js import JetStreamContext

from harmonylite.bus.streams import stream_heads
from harmonylite.cdc import changelog
from harmonylite.config import Config
from harmonylite.db.connection import DbThread
from harmonylite.ops.metrics import Metrics
from harmonylite.replication import conflicts, deadletter, positions
from harmonylite.replication.apply import Applier
from harmonylite.replication.consumer import ShardConsumer
from harmonylite.replication.outcome import ApplyResult
from harmonylite.replication.read_ahead import ReadAhead
from harmonylite.replication.seqmap import read_seq_map, write_seq_map
from harmonylite.restore.coverage import gaps

log = logging.getLogger(__name__)

SEQ_MAP_EVERY = 0.25  # seconds between rewrites of the seq-map file while applying


class Progress:
    """Positions, gaps and counts of one node; the callbacks its consumers report to.

    ``consumers`` is the node's list of consumers (read for the per-stream metrics), ``applier``
    and ``poke`` give the applier (once there is one) and wake the snapshot scheduler;
    ``restart(reason)`` asks the node to start over and says whether it will (False: it already
    does, for another reason).
    """

    def __init__(self, cfg: Config, writer: DbThread, seq_map_path: Path, metrics: Metrics,
                 consumers: Sequence[ShardConsumer], applier: Callable[[], Applier | None],
                 poke: Callable[[], None], restart: Callable[[str], bool]) -> None:
        self.cfg, self.writer, self.seq_map_path, self.metrics = cfg, writer, seq_map_path, metrics
        self._consumers, self._applier, self._poke, self._restart = (
            consumers, applier, poke, restart)
        # The same dict for the node's life: the shard-count cut reads it as it moves.
        self.positions: dict[str, int] = {}
        self.gaps: dict[str, tuple[int, int]] = {}  # found and not covered by a restore
        self.replicated_total = 0
        self.dead_letters = 0
        self.conflicts_at_start = 0
        self._seq_map_written = 0.0  # monotonic time of the last write of the seq-map file
        self._positions_due: asyncio.Task[None] | None = None  # see _write_positions_soon
        self._background: set[asyncio.Task[None]] = set()

    async def load(self, pub_db: DbThread) -> None:
        """The positions, dead letters and conflicts this database holds at start."""
        in_db = await pub_db.call(changelog.applied_sequences)
        from_file = await asyncio.to_thread(read_seq_map, self.seq_map_path) or {}
        # The database copy is written with the data; the file can only lag behind it.
        self.positions.update({**from_file, **in_db})
        await asyncio.to_thread(write_seq_map, self.seq_map_path, self.positions)
        self.dead_letters = await self.writer.call(deadletter.count)
        self.conflicts_at_start = await self.writer.call(conflicts.count)

    async def check_gaps_at_start(self, js: JetStreamContext, streams: list[str],
                                  read_ahead: Mapping[str, ReadAhead],
                                  restored: str | None) -> None:
        """Streams that no longer hold what follows this node's positions, and gaps found
        earlier, are recorded and reported; nothing runs on silently (DESIGN rule 16)."""
        heads = await stream_heads(js, streams)
        # What a stream dropped but its read-ahead still holds is no gap.
        heads = {s: min(first, read_ahead[s].first) if s in read_ahead else first
                 for s, first in heads.items()}
        found = gaps(self.positions, heads)

        def record(conn: sqlite3.Connection) -> None:
            for g in found:
                changelog.record_gap(conn, g.stream, g.first, g.last)

        await self.writer.call(record)
        self.gaps = await self.writer.call(changelog.recorded_gaps)
        if found and restored is not None and self.cfg.snapshot.enabled:
            # The streams dropped what follows the snapshot just restored between recovery's
            # last look and now (heavy writes, short retention): start over to restore a newer
            # one rather than run diverged. Each round restores, so each makes progress.
            self._restart("the streams moved past snapshot " + restored + " (" +
                          ", ".join(map(str, found)) + ")")
        for stream, (first, last) in sorted(self.gaps.items()):
            log.error("this node never applied messages %d..%d of stream %s (the stream dropped "
                      "them): it may differ from the other nodes until it is restored from a "
                      "snapshot that covers them", first, last, stream,
                      extra={"stream": stream, "from_seq": first, "to_seq": last})

    def gap_found(self, stream: str, first: int, last: int) -> None:
        """A consumer met a jump in sequences: record it, then recover or report it."""
        self.metrics.gap_found()
        prev = self.gaps.get(stream)
        self.gaps[stream] = (prev[0] if prev else first, last)
        task = asyncio.get_running_loop().create_task(
            self.writer.call(lambda c: changelog.record_gap(c, stream, first, last)))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # A gap already known at start was the start-up recovery's to cover: starting over
        # again would not cover it better.
        known_at_start = prev is not None and first <= prev[1] + 1
        if self.cfg.snapshot.enabled and not known_at_start \
                and self._restart(f"gap in {stream} ({first}..{last})"):
            log.warning("starting the node over to restore a snapshot that covers the gap in "
                        "%s", stream, extra={"stream": stream})

    def applied(self, stream: str, position: int, result: ApplyResult) -> None:
        self.positions[stream] = position
        # Changes skipped because this node already holds a newer local version count too:
        # the stream's state is in the database either way.
        done = result.rows + result.skipped_pending
        self.replicated_total += done
        self.metrics.replicated(done, published_at=result.published_at)
        if result.failed:
            self.metrics.apply_failed(len(result.failed))
        if result.dead_letters:
            self.dead_letters += result.dead_letters
            self.metrics.dead_lettered(result.dead_letters)
        for c in self._consumers:
            if c.stream == stream:
                self.metrics.stream_state(stream, c.position, c.lag)
        self._poke()
        applier = self._applier()
        if applier is not None and applier.deferred and self._positions_due is None:
            # A group that wrote nothing else left its position in memory (see
            # replication.positions): written once it is MAX_AGE old, also when nothing follows,
            # so a snapshot taken a moment later (by this node or by the CLI) holds it.
            self._positions_due = asyncio.get_running_loop().create_task(
                self._write_positions_soon())
        # The file mirrors the positions the database holds (and can only lag behind them):
        # rewritten at most every SEQ_MAP_EVERY seconds, not per applied group, whose file
        # create and rename cost the node more than applying a small group; written again, and
        # durably, at shutdown.
        now = time.monotonic()
        if now - self._seq_map_written < SEQ_MAP_EVERY:
            return
        self._seq_map_written = now
        try:
            write_seq_map(self.seq_map_path, self.positions)
        except OSError as exc:
            log.error("cannot write %s: %s", self.seq_map_path, exc)

    async def _write_positions_soon(self) -> None:
        try:
            await asyncio.sleep(positions.MAX_AGE)
            applier = self._applier()
            if applier is not None:
                await self.writer.call(applier.flush_positions)
        except sqlite3.Error as exc:
            log.warning("stream positions not recorded yet (retried with the next group, by "
                        "housekeeping and at stop): %s", exc)
        finally:
            self._positions_due = None

    async def flush(self) -> None:
        """At stop: the positions of groups that wrote nothing else, into the database."""
        if self._positions_due is not None:
            self._positions_due.cancel()  # written just below
        applier = self._applier()
        if applier is not None:
            try:  # positions of groups that wrote nothing else (see replication.positions)
                await self.writer.call(applier.flush_positions)
            except sqlite3.Error as exc:
                log.warning("stream positions not recorded at shutdown (their messages are "
                            "applied again on the next start, which is harmless): %s", exc)

    def write_file(self) -> None:
        """At stop: the seq-map file, durably."""
        if self.positions:
            with contextlib.suppress(OSError):
                write_seq_map(self.seq_map_path, self.positions, durable=True)

