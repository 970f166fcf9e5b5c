"""A chunk of a batch as the messages to publish: cut per shard, under the server's payload limit.

Every message of a batch but the last on its shard says "more follows"; a shard that got a "more"
message and has nothing in the batch's last chunk gets an empty message that ends the batch there.
Message ids repeat when a batch is sent again (same cut, same epoch), so JetStream drops copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.cdc.changelog import Change
from harmonylite.cdc.schema import fold_key
from harmonylite.config import Config
from harmonylite.replication.batches import BatchReader, Chunk
from harmonylite.replication.event import encode, encode_into, raw_size, shard_of
from harmonylite.replication.large_changes import server_limit, split_by_size
from harmonylite.replication.spool import Payload, Spooled


class _Counter:
    """A sink that only counts what is written to it."""

    def __init__(self) -> None:
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass


@dataclass
class Outgoing:
    msg_id: str
    subject: str
    payload: Payload  # a large one in a file (sent out of band)
    count: int
    first: tuple[str, tuple[object, ...]]  # table and key of its first change, for reports
    more: bool = False  # more of the batch follows on this shard
    acked: bool = False
    # Set once the payload is stored out of band: the small message published in its place.
    reference: bytes | None = None
    batch: int = 0  # the batch's last change id
    shards: str = ""  # on a message that ends the batch on its shard: every shard it wrote to
    stream: str = ""  # the stream its subject is stored in
    last_id: int = 0  # its last change's id (0: it carries none)


@dataclass
class InFlight:
    """One chunk of a batch, as the messages to send."""

    upto: int
    entries: int  # change-log entries it covers (several changes to a row collapse into one)
    final: bool  # the batch's last chunk
    messages: list[Outgoing] = field(default_factory=list)


class ShardMessages:
    """Builds each chunk's messages; remembers which shards the open batch told "more follows"."""

    def __init__(self, cfg: Config, js: JetStreamContext, batches: BatchReader) -> None:
        self.cfg, self.js = cfg, js
        self._batches = batches  # the batch being read: its epoch and its last change id
        self.opened: set[int] = set()  # shards sent a "more follows" in the open batch

    def build(self, batch: Chunk) -> InFlight:
        by_name, changes = batch.shapes, batch.changes
        shards = self.cfg.replication_log.shards
        groups: dict[int, list[Change]] = {}
        for ch in changes:
            shape = by_name[ch.table]
            # A table with a secondary UNIQUE constraint needs one order for all its rows (a
            # value moving between rows): the whole table goes to one shard.
            # A key is hashed as its collation compares it ('Key' and 'KEY' under NOCASE are
            # one row, so one stream).
            key = [] if shape.single_order else list(fold_key(
                [ch.values[i] for i in shape.pk_indexes], shape.key_collations))
            groups.setdefault(shard_of(ch.table, key, shards), []).append(ch)
        flight = InFlight(upto=batch.upto, entries=batch.entries, final=batch.final)
        compress = self.cfg.replication_log.compress
        limit = server_limit(self.js)

        # A batch begun before a stop goes out again under the epoch it first went out under
        # (every start takes a new one, see ``cdc.origin``), so its message ids match.
        node, epoch = self.cfg.node_id, self._batches.batch_epoch

        def size_of(part: list[Change]) -> int:
            if raw_size(part) <= limit:
                return len(encode(node, part, by_name, compress, epoch))
            counted = _Counter()  # large values: measured without a copy of the encoding
            encode_into(counted, node, part, by_name, compress, epoch)
            return counted.size

        def payload_of(part: list[Change]) -> Payload:
            if raw_size(part) <= limit:
                return encode(node, part, by_name, compress, epoch)
            # Likely carried out of band: encoded into a file, uploaded from there.
            spooled = Spooled(Path(self.cfg.db_path).parent)
            encode_into(spooled, node, part, by_name, compress, epoch)
            if len(spooled) > limit:
                return spooled
            small = spooled.read()  # compressed into a message after all
            spooled.close()
            return small

        last: dict[int, Outgoing] = {}  # each shard's last message
        for shard, group in sorted(groups.items()):
            for part in split_by_size(group, size_of, limit):
                msg_id = f"{self.cfg.node_id}:{epoch}:{part[0].id}-{part[-1].id}:{shard}"
                payload = payload_of(part)
                subject = namespace(self.cfg).subject(shard)
                shape = by_name[part[0].table]
                first = (part[0].table, tuple(part[0].values[i] for i in shape.pk_indexes))
                last[shard] = Outgoing(msg_id, subject, payload, len(part), first, more=True,
                                       batch=self._batches.end,
                                       stream=namespace(self.cfg).stream(shard),
                                       last_id=part[-1].id)
                flight.messages.append(last[shard])
        self._mark_ends(flight, last)
        return flight

    def _mark_ends(self, flight: InFlight, last: dict[int, Outgoing]) -> None:
        """In a batch's last chunk, each shard's last message ends the batch on that shard; a
        shard that got "more follows" earlier and has nothing here gets an empty message that
        ends it. The flags of earlier chunks stay: more of the batch follows."""
        if not flight.final:
            self.opened.update(last)
            return
        for m in last.values():
            m.more = False
        compress = self.cfg.replication_log.compress
        for shard in sorted(self.opened - set(last)):
            epoch = self._batches.batch_epoch
            payload = encode(self.cfg.node_id, [], {}, compress, epoch)
            msg_id = f"{self.cfg.node_id}:{epoch}:end-{flight.upto}:{shard}"
            flight.messages.append(Outgoing(msg_id, namespace(self.cfg).subject(shard), payload, 0,
                                            ("", ()), batch=self._batches.end))
        ends = ",".join(str(n) for n in sorted(self.opened | set(last)))
        for m in flight.messages:
            if not m.more:
                m.shards = ends
        self.opened = set()
