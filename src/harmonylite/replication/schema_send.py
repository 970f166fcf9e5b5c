"""Sending this node's schema changes (``replicate_ddl = true``), between publish batches.

The publisher calls :meth:`SchemaSender.send` when no batch is open: every change it had read
from the change log before went out first, and every change it reads after goes out after, so a
receiver meets the schema change between the rows written before it and the rows written under
it (rows read under the new schema a moment before the change was captured reach receivers
first, and wait parked there until it arrives).

Schema changes travel on the first stream only: every node meets all of them in one order, the
order that decides between two nodes changing the same table at once (see ``schema_apply``).
"""

from __future__ import annotations

import json
import logging

from nats.js import JetStreamContext

from harmonylite.bus.names import namespace
from harmonylite.cdc import schema_changes
from harmonylite.config import Config
from harmonylite.db.connection import DbThread, write_transaction
from harmonylite.replication.event import ORIGIN_HEADER, encode_schema_change

log = logging.getLogger(__name__)

ACK_TIMEOUT = 2.0


class SchemaSender:
    def __init__(self, cfg: Config, db: DbThread, js: JetStreamContext, epoch: str) -> None:
        self.cfg = cfg
        self.db = db
        self.js = js
        self.epoch = epoch
        self.sent = 0

    async def send(self) -> int:
        """Publish the schema changes waiting to go out, oldest first; returns how many."""
        node = self.cfg.node_id

        def waiting() -> list[schema_changes.SchemaChange]:
            return [c for c in schema_changes.rows(self.db.aux(), "pending") if c.origin == node]

        done = 0
        for change in await self.db.call(lambda _: waiting()):
            objects = json.loads(schema_changes.encode_touched(change.objects))
            payload = encode_schema_change(node, self.epoch, change.uid, objects, change.stmts,
                                           self.cfg.replication_log.compress)
            # The id is the change's own: sent again after a crash, JetStream drops the copy.
            headers = {"Nats-Msg-Id": f"{node}:schema:{change.uid}",
                       ORIGIN_HEADER: f"{node}:{self.epoch}"}
            await self.js.publish(namespace(self.cfg).subject(1), payload, headers=headers,
                                  timeout=ACK_TIMEOUT)
            uid = change.uid

            def mark(uid: str = uid) -> None:
                conn = self.db.aux()
                with write_transaction(conn):
                    conn.execute(f"UPDATE {schema_changes.CHANGES} SET state = 'sent' "
                                 "WHERE uid = ? AND state = 'pending'", (uid,))

            await self.db.call(lambda _: mark())
            log.info("schema change %s sent (%s)", uid, ", ".join(sorted(change.objects)),
                     extra={"schema_change": uid})
            done += 1
        self.sent += done
        return done
