"""Applying a schema change from another node (``replicate_ddl = true``), in the applier's
transaction, at its place in the stream.

Every node meets the schema changes in one order (they all travel on the first stream), and
decides each the same way:

- **Its objects are as the change found them** on its origin: its statements run; the objects
  must then be exactly as on the origin, or the change is made again from a plan of this node's
  own (see :mod:`harmonylite.cdc.schema_plan`).
- **They are already as the change left them** (the same migration ran here too): nothing to do.
- **They differ because of this node's own change not yet back from the stream**: the change
  arriving now came first, so it wins. This node's own changes to those objects are undone and
  the winner's made (one plan from the schema here to the winner's), the own ones are recorded
  as ``lost``, and the rows of their tables are published again under the winning schema, so
  what this node wrote under its own schema reaches the others as far as the winner's columns
  hold it (what the others parked from it is applied without the columns that lost).
- **They differ otherwise** (a change earlier in the stream changed them since its origin read
  them): the arriving change lost; it is recorded as ``lost``, and its origin undoes it when it
  meets the winner.

A change that cannot be applied here at all (SQLite refuses it: a virtual table module missing
on this node) rolls back whole and is recorded as ``failed`` with SQLite's reason: never half
applied.
"""

from __future__ import annotations

import logging
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field

from harmonylite.cdc import ddl, schema_changes, schema_plan
from harmonylite.cdc.install import install_in_transaction, report_install
from harmonylite.cdc.schema_changes import Touched
from harmonylite.cdc.schema_plan import Objects, PlanError
from harmonylite.db.connection import PREFIX, quote_ident, savepoint
from harmonylite.replication.event import Batch
from harmonylite.replication.outcome import is_transient
from harmonylite.replication.own_changes import OwnOrigins

log = logging.getLogger(__name__)


@dataclass
class SchemaOutcome:
    state: str  # applied | duplicate | lost | failed
    changed: bool = False  # the schema here changed
    republish: list[str] = field(default_factory=list)  # tables to publish again (own lost)
    tables: list[str] = field(default_factory=list)  # the tables it changed, as they are now


def _drop_capture(conn: sqlite3.Connection, tables: set[str]) -> None:
    """Capture triggers of ``tables`` go before the statements run (SQLite would refuse to drop
    a column they name); they are installed again after."""
    for (tid,) in conn.execute(f"SELECT tid FROM {ddl.TABLES} WHERE name IN "
                               f"({', '.join('?' for _ in tables)})", sorted(tables)).fetchall():
        for (name,) in conn.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'trigger' AND name GLOB ?",
                (f"{PREFIX}t{int(tid)}_*",)).fetchall():
            conn.execute(f"DROP TRIGGER {quote_ident(str(name))}")


def _tables_of(objs: Touched) -> set[str]:
    return {o.tbl_name for pair in objs.values() for o in pair if o is not None}


def _with(base: Objects, objs: Touched, *, after: bool) -> Objects:
    out = dict(base)
    for name, (b, a) in objs.items():
        want = a if after else b
        if want is None:
            out.pop(name, None)
        else:
            out[name] = want
    return out


class _NotAsSent(Exception):
    """The statements ran, and the schema is not the origin's: rolled back like a failure."""


def _run(conn: sqlite3.Connection, stmts: list[str], check: Callable[[], bool],
         tables: set[str]) -> str:
    """Run ``stmts`` under a savepoint, the capture triggers of ``tables`` dropped first;
    '' when ``check()`` holds after, else the reason (and everything rolled back, the triggers
    too)."""
    try:
        with savepoint(conn, "schema_change"):
            _drop_capture(conn, tables)
            schema_plan.run_plan(conn, stmts)
            if not check():
                raise _NotAsSent("the statements did not give the origin's definitions")
    except _NotAsSent as exc:
        reason = str(exc)
    except sqlite3.Error as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        return ""
    conn.execute("PRAGMA legacy_alter_table = OFF")
    return reason


# What a plan is made of (see ``schema_plan``); a message asking for anything else (ATTACH, a
# PRAGMA that writes the schema directly, …) is refused, not run.
_ALLOWED = re.compile(r"^\s*(CREATE\s|DROP\s|ALTER\s+TABLE\s|INSERT\s+INTO\s|SELECT 1$|"
                      r"PRAGMA legacy_alter_table = (ON|OFF)$)", re.IGNORECASE)
_CREATE = re.compile(r"^\s*CREATE\s", re.IGNORECASE)


def refused_statement(stmts: list[str], objs: Touched) -> str:
    """The first statement or definition a schema change may not carry ('' when none)."""
    defs = [o.sql for pair in objs.values() for o in pair if o is not None]
    return next((s for s in stmts if not _ALLOWED.match(s)), "") or next(
        (d for d in defs if not _CREATE.match(d)), "")


def apply_change(conn: sqlite3.Connection, stream: str, seq: int, batch: Batch, node_id: int,
                 replicated: Callable[[str], bool] | None) -> SchemaOutcome:
    """Apply the schema change ``batch`` carries (see the module's docstring)."""
    assert batch.schema is not None
    uid = str(batch.schema["u"])
    objs = schema_changes.decode_touched(batch.schema["o"])
    stmts = [str(s) for s in batch.schema["s"]]
    schema_changes.ensure(conn)
    bad = refused_statement(stmts, objs)
    if bad:
        reason = f"refused: it carries {bad[:200]!r}, which is no part of a schema change"
        schema_changes.record(conn, uid, batch.node_id, "failed", objs, stmts, reason)
        log.error("schema change %s of node %d not applied: %s", uid, batch.node_id, reason,
                  extra={"schema_change": uid, "stream": stream, "sequence": seq})
        return SchemaOutcome("failed")
    known = schema_changes.get(conn, uid)
    if known is not None:
        if known.state in ("pending", "sent"):  # this node's own, back from the stream
            schema_changes.set_state(conn, uid, "applied")
        return SchemaOutcome("duplicate")
    # A change the application made here that the node has not looked at yet counts as this
    # node's own, in flight.
    schema_changes.capture(conn, node_id, replicated)
    live = schema_changes.current(conn, replicated)
    names = ", ".join(sorted(objs))
    origin = batch.node_id
    clash = [n for n, (before, _) in objs.items() if live.get(n) != before]
    if clash and all(live.get(n) == a for n, (_, a) in objs.items()):
        schema_changes.record(conn, uid, origin, "applied", objs, stmts)
        return SchemaOutcome("applied")  # the same change was made here too
    mine = [c for c in schema_changes.rows(conn, "pending", "sent")
            if c.origin == node_id and set(c.objects) & set(objs)]
    if clash and not all(any(n in c.objects for c in mine) for n in clash):
        reason = (f"lost: {', '.join(map(repr, clash))} had been changed by an earlier schema "
                  f"change in the stream when node {origin} changed them")
        schema_changes.record(conn, uid, origin, "lost", objs, stmts, reason)
        log.warning("schema change %s of node %d (%s) not applied: %s", uid, origin, names,
                    reason, extra={"schema_change": uid, "stream": stream, "sequence": seq})
        return SchemaOutcome("lost")
    undone = live  # this node's own changes undone (when the arriving one wins over them)
    for own in reversed(mine if clash else []):
        undone = _with(undone, own.objects, after=False)
    target = _with(undone, objs, after=True)
    touched_tables = _tables_of(objs) | {t for c in (mine if clash else []) for t in
                                         _tables_of(c.objects)}
    drop = touched_tables & set(live)

    def reached() -> bool:
        now = schema_changes.current(conn, replicated)
        return all(now.get(n) == target.get(n) for n in set(target) | set(now))

    if clash:
        # Undone first, then the winner's own statements: a plan straight to the winner's
        # schema could take the loser's new column for a renamed one.
        try:
            reason = _run(conn, schema_plan.plan(live, undone) + stmts, reached, drop)
        except PlanError as exc:
            reason = str(exc)
    else:
        reason = _run(conn, stmts, reached, drop)
    if reason:
        try:
            own_plan = schema_plan.plan(live, target)
        except PlanError as exc:
            reason = f"{reason}; {exc}"
        else:
            reason = _run(conn, own_plan, reached, drop)
    if reason:
        schema_changes.record(conn, uid, origin, "failed", objs, stmts, reason)
        log.error("schema change %s of node %d (%s) cannot be applied here and is not: %s; "
                  "the changes to its tables wait (parked) until this node has that schema",
                  uid, origin, names, reason,
                  extra={"schema_change": uid, "stream": stream, "sequence": seq})
        return SchemaOutcome("failed", changed=False)
    schema_changes.record(conn, uid, origin, "applied", objs, stmts)
    out = SchemaOutcome("applied", changed=True, tables=sorted(
        t for t in touched_tables if target.get(t) is not None and target[t].type == "table"))
    if clash:
        for own in mine:
            why = (f"lost to schema change {uid} of node {origin}, which came first in the "
                   f"stream ({stream} sequence {seq}) and changed {names}")
            schema_changes.set_state(conn, own.uid, "lost", why)
            log.warning("this node's schema change %s (%s) %s: undone here; the rows of its "
                        "tables are published again under the winning schema", own.uid,
                        ", ".join(sorted(own.objects)), why, extra={"schema_change": own.uid})
        out.republish = out.tables
    log.info("schema change %s of node %d applied: %s", uid, origin, names,
             extra={"schema_change": uid, "stream": stream, "sequence": seq})
    return out


class SchemaMessages:
    """The applier's part for a message carrying a schema change: applied when this node
    replicates them (``replicate_ddl``), capture installed again, and the rows to publish again
    marked. Its parts: this database's own origins and the tables it replicates."""

    def __init__(self, own: OwnOrigins, replicated: Callable[[str], bool] | None, *,
                 replicate_ddl: bool = False) -> None:
        self.own = own
        self.replicated = replicated
        self.replicate_ddl = replicate_ddl
        self._ignored = False  # a schema change arrived while replicate_ddl is false (logged)

    def apply(self, conn: sqlite3.Connection, stream: str, seq: int, batch: Batch) -> bool:
        """The schema change ``batch`` carries, in the applier's transaction (the guard flag
        set). True when the schema here changed: the applier's cached tables are stale."""
        if not self.replicate_ddl:
            if not self._ignored:
                self._ignored = True
                log.warning("%s sequence %d: a schema change from node %d is not applied: "
                            "replicate_ddl is false on this node (every node must share the "
                            "setting)", stream, seq, batch.node_id,
                            extra={"stream": stream, "sequence": seq})
            return False
        try:
            with savepoint(conn, "schema_msg"):
                outcome = apply_change(conn, stream, seq, batch, self.own.node_id, self.replicated)
        except Exception as exc:
            if is_transient(exc):
                raise
            # Not a schema change this node can read (a malformed message): recorded, and
            # the stream goes on; the changes to its tables wait parked.
            uid = str((batch.schema or {}).get("u", f"{stream}:{seq}"))
            reason = f"{type(exc).__name__}: {exc}"
            schema_changes.ensure(conn)
            schema_changes.record(conn, uid, batch.node_id, "failed", {}, [], reason)
            log.error("%s sequence %d: schema change %s of node %d cannot be applied: %s",
                      stream, seq, uid, batch.node_id, reason,
                      extra={"stream": stream, "sequence": seq, "schema_change": uid})
            return False
        if not outcome.changed:
            return False
        report = install_in_transaction(conn, self.replicated, backfill=False)
        report_install(report, at_start=False)
        for table in outcome.republish:
            schema_changes.republish(conn, table)
        if self.own.origin and not outcome.republish:
            # This node's own changes to these tables that were sent under the old schema and
            # are not back yet: sent again under the new one.
            back = self._own_back(conn)
            for table in outcome.tables:
                schema_changes.republish_in_flight(conn, table, back)
        schema_changes.remember(conn, schema_changes.current(conn, self.replicated))
        return True

    def _own_back(self, conn: sqlite3.Connection) -> int:
        """How far this node's own changes have come back from every stream (the lowest of
        its origins' marks over the streams; 0 when one has none)."""
        own = sorted(self.own.origins)
        if not own:
            return 0
        marks = [int(m) for (m,) in conn.execute(
            f"SELECT max(hwm) FROM {ddl.ORIGINS} WHERE origin IN "
            f"({', '.join('?' for _ in own)}) GROUP BY stream", own)]
        return min(marks) if marks else 0
