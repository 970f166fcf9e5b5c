"""The seeded application: one writer thread per node, and the history of committed writes.

Every transaction runs under ``BEGIN IMMEDIATE``. Around each statement the writer reads the rows
it may touch (the target key, rows holding the same unique value, children of a parent) before and
after, inside the transaction; on COMMIT the differences become the history's committed writes
(``image``) and deletes (``None``). A rolled-back or rejected transaction records nothing.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import schema
from .profiles import Profile

Image = tuple[str, ...]
RowKey = tuple[str, tuple[str, ...]]  # (table, folded key)
Value = tuple[str, object]  # (SQL expression with one "?", parameter)
Effect = tuple[RowKey, Image | None]
Watch = tuple[schema.Table, str, list[object]]  # rows of a table matching a WHERE clause
Step = Callable[[sqlite3.Connection], list[Effect]]


@dataclass
class History:
    """Committed writes per row, from every node, in commit order per node."""
    writes: dict[RowKey, list[tuple[int, Image | None]]] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    events: list[tuple[int, int]] = field(default_factory=list)  # (origin, n) inserted
    event_set: set[tuple[int, int]] = field(default_factory=set)
    # Per row, the latest wall-clock time (time.time()) at which a transaction writing it was
    # about to commit: its change can reach the streams only after that moment.
    last_write_at: dict[RowKey, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, node: int, effects: list[Effect], at: float | None = None) -> None:
        with self.lock:
            for key, image in effects:
                self.writes.setdefault(key, []).append((node, image))
                if at is not None:
                    self.last_write_at[key] = max(at, self.last_write_at.get(key, at))
                if key[0] == "events" and image is not None:
                    ev = (int(key[1][0][8:]), int(key[1][1][8:]))
                    if ev not in self.event_set:
                        self.event_set.add(ev)
                        self.events.append(ev)

    def count(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n


COLLIDE_EVERY = 0.5  # seconds between the moments every node writes the same row

FULL_DOMAIN: tuple[Value, ...] = (
    ("?", None), ("?", 0), ("?", -1), ("?", 2**63 - 1), ("?", -(2**63)), ("?", 0.0),
    ("?", -0.0), ("?", 1.5), ("?", 1e308), ("?", -1e308), ("?", float("inf")),
    ("?", float("-inf")), ("?", 5e-324), ("?", ""), ("?", "plain"), ("?", "ünïcödé ✓ 🚀"),
    ("?", "nul\x00inside"), ("?", "12"), ("?", b""), ("?", b"\x00\xff\x00"),
    ("CAST(? AS TEXT)", b"\xffA"), ("CAST(? AS TEXT)", b"ok\xc3("),
)


def gen_value(rng: random.Random, kind: str) -> Value:
    if kind == "plain" or rng.random() < 0.4:
        return rng.choice((("?", rng.randint(-1000, 1000)), ("?", f"s{rng.randint(0, 99999)}"),
                           ("?", rng.random())))
    if kind == "huge" and rng.random() < 0.08:
        return ("?", rng.randbytes(1_500_000))
    r = rng.random()
    if r < 0.05:
        return ("?", rng.randbytes(200_000))
    if r < 0.1:
        return ("?", "x" * 150_000 + str(rng.random()))
    if r < 0.2:
        return ("?", rng.randbytes(rng.randint(1, 64)))
    return rng.choice(FULL_DOMAIN)


class Writer(threading.Thread):
    """The application on one node: transactions until ``stop`` is set."""

    def __init__(self, index: int, db: Path, profile: Profile, seed: int, history: History,
                 stop: threading.Event, t0: float,
                 on_migrated: Callable[[int], None] | None = None) -> None:
        super().__init__(name=f"writer-{index}", daemon=True)
        self.index, self.node_id = index, index + 1
        self.db, self.profile, self.history, self.stop = db, profile, history, stop
        self.rng = random.Random(seed * 7919 + index)
        self.collide_rng_seed = seed
        self.seed = seed
        self.t0 = t0
        self.on_migrated = on_migrated
        self.tables = [t for t in schema.tables_for(profile.features)
                       if t.name not in ("mig", "fresh")]
        self.counter = 0
        self.migration_step = 0
        self.error: BaseException | None = None
        self.conn: sqlite3.Connection | None = None
        self.migrated: list[str] = []  # migrations this node's application committed
        # Held while the application has its database closed (an operator's forced restore).
        self.app = threading.Lock()

    def close_database(self) -> None:
        """The application closes its database until :meth:`reopen_database` (it waits for the
        transaction under way)."""
        self.app.acquire()
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def reopen_database(self) -> None:
        self.app.release()

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=3,
                               check_same_thread=False)
        if "fk" in self.profile.features:
            conn.execute("PRAGMA foreign_keys = ON")
        return conn

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            slot = 1
            while not self.stop.is_set():
                elapsed = time.monotonic() - self.t0
                with self.app:
                    if self.conn is None:
                        self.conn = self._connect()
                    if self.profile.migrations:
                        self._maybe_migrate(elapsed)
                    self.one_transaction()
                pause = self.rng.uniform(0.005, 0.04)  # pacing, not synchronisation
                until_slot = self.t0 + slot * COLLIDE_EVERY - time.monotonic()
                if until_slot < pause:
                    # Every node writes the same row / unique value at the same instant.
                    self.stop.wait(max(0.0, until_slot))
                    with self.app:
                        if self.conn is None:
                            self.conn = self._connect()
                        self.transaction([self._collide_op(slot)], commit=True)
                    slot += 1
                    continue
                self.stop.wait(pause)
            if self.profile.migrations:
                self.finish_migrations()
        except BaseException as exc:  # reported by the harness
            self.error = exc
        finally:
            if self.conn is not None:
                self.conn.close()

    def one_transaction(self) -> None:
        ops = self.profile.ops
        kind = self.rng.choices(list(ops), weights=list(ops.values()))[0]
        if kind == "vacuum":
            self._vacuum()
            return
        if self.profile.migrations and self.rng.random() < 0.35:
            rid = self.rng.randrange(self.profile.hot_keys * 3)
            self.transaction([lambda conn: self._mig(conn, rid)], commit=True)
            return
        if kind in ("multi", "rollback"):
            n = self.rng.randint(2, 4)
            basic = [k for k in ops if k not in ("multi", "rollback", "vacuum")]
            steps = [self._op(self.rng.choice(basic)) for _ in range(n)]
            self.transaction(steps, commit=kind == "multi")
            return
        self.transaction([self._op(kind)], commit=True)

    def transaction(self, steps: list[Step],
                    commit: bool) -> None:
        conn = self.conn
        assert conn is not None
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            self.history.count("busy")
            return
        effects: list[Effect] = []
        try:
            for step in steps:
                effects += step(conn)
            if not commit:
                conn.execute("ROLLBACK")
                self.history.count("rolled back")
                return
            at = time.time()  # before COMMIT: the change is published after this moment
            conn.execute("COMMIT")
        except sqlite3.IntegrityError:
            conn.execute("ROLLBACK")
            self.history.count("rejected (constraint)")
            return
        except sqlite3.OperationalError as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.history.count(f"failed: {str(exc)[:40]}")
            return
        self.history.record(self.node_id, effects, at)
        self.history.count("committed")
        self.history.count("row writes", len(effects))

    # --- operations ----------------------------------------------------------------------
    def _key(self, t: schema.Table, rng: random.Random, hot_only: bool = False
             ) -> dict[str, object]:
        hot = rng.randrange(self.profile.hot_keys)
        fresh = not hot_only and rng.random() < 0.3
        if fresh:
            self.counter += 1
        num = self.node_id * 1_000_000 + self.counter if fresh else hot
        if t.name == "pair":
            return {"a": num % 7 if not fresh else num, "b": f"b{hot % 3}"}
        if t.name == "wr":
            return {"k": f"k{num}"}
        if t.name == "tags":  # the word may be shared, its case is this node's own
            word = rng.choice(("alpha", "beta", "gamma", "delta"))
            if hot_only:  # a new word that every node writes at once, each in its own case
                word = f"w{rng.randrange(10**6)}x"
            return {"name": "".join(ch.upper() if self.rng.random() < 0.5 else ch
                                    for ch in word)}
        if t.name == "events":
            if rng.random() < 0.5 and self.history.events:
                origin, n = rng.choice(self.history.events)
                return {"origin": origin, "n": n}
            self.counter += 1
            return {"origin": self.node_id, "n": self.counter}
        if t.name == "child" and not fresh:
            return {"id": 100 + hot}
        return {"id": num}

    def _values(self, t: schema.Table, rng: random.Random,
                shared: random.Random | None = None) -> dict[str, Value]:
        kind = self.profile.values
        vals: dict[str, Value] = {}
        for c in t.checked:
            if c in t.key:
                continue
            if c == "email":
                email = f"u{rng.randrange(6)}@x"
                if shared is not None:  # a value no row holds yet, written by every node
                    email = f"c{shared.randrange(10**9)}@x"
                vals[c] = ("?", email)
            elif c == "pid":
                vals[c] = ("?", rng.randrange(self.profile.hot_keys))
            elif c == "n":
                vals[c] = ("?", rng.randint(0, 10**6))
            elif t.feature == "fts":  # words the index is asked for afterwards
                vals[c] = ("?", " ".join(rng.choice(schema.WORDS) for _ in range(3)))
            else:
                vals[c] = gen_value(rng, kind)
        return vals

    def _op(self, kind: str) -> Step:
        t = self.rng.choice(self.tables)
        if t.name == "parent" and kind == "insert" and self.rng.random() < 0.5:
            t = schema.table("child")
        return self._op_on(t, kind, self.rng)

    def _op_on(self, t: schema.Table, kind: str, krng: random.Random,
               hot_only: bool = False) -> Step:
        rng = self.rng
        if hot_only and t.name == "users":  # same unique value, a different row per node
            key = self._key(t, rng)
            vals = self._values(t, rng, shared=krng)
        else:
            key = self._key(t, krng, hot_only)
            vals = self._values(t, rng)
        if not t.has_pk and kind in ("upsert", "replace", "keychange"):
            kind = "insert" if key["origin"] == self.node_id else "update"
        if t.name == "events" and kind == "insert" and key["origin"] != self.node_id:
            kind = "update"
        q = {c: '"' + c + '"' for c in (*key, *vals)}
        where = " AND ".join(f"{q[c]} = ?" for c in key)
        kparams = list(key.values())
        watches: list[Watch] = [(t, where, kparams)]
        cols = [*key, *vals]
        exprs = [*(["?"] * len(key)), *(v[0] for v in vals.values())]
        params = [*kparams, *(v[1] for v in vals.values())]
        ins = f'INTO "{t.name}"({", ".join(q[c] for c in cols)}) VALUES ({", ".join(exprs)})'
        sets = ", ".join(f"{q[c]} = {v[0]}" for c, v in vals.items())
        vparams = [v[1] for v in vals.values()]
        if kind == "insert":
            sql, sp = f"INSERT {ins}", params
        elif kind == "update":
            sql, sp = f'UPDATE "{t.name}" SET {sets} WHERE {where}', vparams + kparams
        elif kind == "delete":
            sql, sp = f'DELETE FROM "{t.name}" WHERE {where}', kparams
        elif kind == "upsert":
            bump = ', "n" = coalesce("n", 0) + 1' if "n" in t.checked and "n" not in key else ""
            upd = ", ".join(f"{q[c]} = excluded.{q[c]}" for c in vals) + bump
            sql = f"INSERT {ins} ON CONFLICT({', '.join(q[c] for c in key)}) DO UPDATE SET {upd}"
            sp = params
        elif kind == "replace":
            sql, sp = f"INSERT OR REPLACE {ins}", params
        elif kind == "keychange":
            new = self._key(t, rng)
            nwhere = " AND ".join(f'"{c}" = ?' for c in new)
            watches.append((t, nwhere, list(new.values())))
            nset = ", ".join(f'"{c}" = ?' for c in new)
            sql, sp = f'UPDATE "{t.name}" SET {nset} WHERE {where}', [*new.values(), *kparams]
        else:
            raise ValueError(kind)
        if "email" in vals:
            watches.append((t, '"email" = ?', [vals["email"][1]]))
        if t.name == "parent":
            watches.append((schema.table("child"), '"pid" = ?', kparams))
        return lambda conn: self._watched(conn, watches, sql, sp)

    def _collide_op(self, slot: int) -> Step:
        shared = random.Random(self.collide_rng_seed * 31 + slot)  # same table and key everywhere
        t = shared.choice(self.tables)
        kinds = ("upsert", "insert", "replace") if t.name in ("users", "tags") else (
            "upsert", "insert", "update", "replace")
        kind = shared.choice([k for k in kinds if k in self.profile.ops])
        return self._op_on(t, kind, shared, hot_only=True)

    def _watched(self, conn: sqlite3.Connection, watches: list[Watch], sql: str,
                 params: list[object]) -> list[Effect]:
        before = [self._rows(conn, t, w, p) for t, w, p in watches]
        counted = [self._images(conn, t, w, p) for t, w, p in watches]
        conn.execute(sql, params)
        effects: list[Effect] = []
        for (t, w, p), pre, pre_n in zip(watches, before, counted, strict=True):
            post = self._rows(conn, t, w, p)
            if not t.has_pk:
                # A table without a primary key is a multiset: one statement may write several
                # equal rows (several rows matched), each one a write of that content.
                idx = [t.checked.index(c) for c in t.key]
                post_n = self._images(conn, t, w, p)
                for img, n in post_n.items():
                    k = schema.fold_key(tuple(img[i] for i in idx), t.nocase_key)
                    effects += [((t.name, k), img)] * max(n - pre_n[img], 0)
                effects += [((t.name, k), None) for k in pre if k not in post]
                continue
            for k, img in post.items():
                if pre.get(k) != img:
                    effects.append(((t.name, k), img))
            effects += [((t.name, k), None) for k in pre if k not in post]
        return effects

    @staticmethod
    def _images(conn: sqlite3.Connection, t: schema.Table, where: str, params: list[object]
                ) -> Counter[Image]:
        if t.has_pk:
            return Counter()
        rows = conn.execute(f'SELECT {schema.select_exact(t.checked)} FROM "{t.name}" '
                            f"WHERE {where}", params).fetchall()
        return Counter(schema.encode_row(r) for r in rows)

    @staticmethod
    def _rows(conn: sqlite3.Connection, t: schema.Table, where: str, params: list[object]
              ) -> dict[tuple[str, ...], Image]:
        rows = conn.execute(f'SELECT {schema.select_exact(t.checked)} FROM "{t.name}" '
                            f"WHERE {where}", params).fetchall()
        out = {}
        idx = [t.checked.index(c) for c in t.key]
        for r in rows:
            img = schema.encode_row(r)
            out[schema.fold_key(tuple(img[i] for i in idx), t.nocase_key)] = img
        return out

    def _mig(self, conn: sqlite3.Connection, rid: int) -> list[Effect]:
        from .migrations import mig_statement
        sql, params = mig_statement(conn, self.rng, rid)
        return self._watched(conn, [(schema.table("mig"), '"id" = ?', [rid])], sql, params)

    def _vacuum(self) -> None:
        assert self.conn is not None
        try:
            self.conn.execute("VACUUM")
            self.history.count("vacuum")
        except sqlite3.OperationalError:
            self.history.count("busy")

    def _maybe_migrate(self, elapsed: float) -> None:
        from .migrations import STEPS
        period = self.profile.write_seconds / (len(STEPS) + 2)
        due = (self.migration_step + 1) * period + self.index * period / 3
        if self.migration_step < len(STEPS) and elapsed >= due:
            self._migrate_next()

    def finish_migrations(self) -> None:
        """The rollout completed after the writes: the steps this node had not reached yet
        (each restart of ``schema_restart`` slows a node down; on a loaded machine the write
        phase may end before its last steps, and nodes left on different schemas are an
        unfinished rollout, not a divergence)."""
        from .migrations import STEPS
        while self.migration_step < len(STEPS):
            with self.app:
                if self.conn is None:
                    self.conn = self._connect()
                self._migrate_next()

    def _migrate_next(self) -> None:
        from .migrations import FRESH_STEP, STEPS, run_step
        if self.migration_step < len(STEPS):
            assert self.conn is not None
            mine = not self.profile.migrate_once or self.migration_step % 3 == self.index
            if mine and self.profile.migrate_once:
                from .migrations import reached
                # The deploy runs the next migration where the previous ones have arrived.
                deadline = time.monotonic() + 60
                while not reached(self.conn, self.migration_step) and \
                        time.monotonic() < deadline:
                    time.sleep(0.05)  # polling another node's migration, with a deadline
            if mine and run_step(self.conn, self.migration_step, self.node_id, self.history,
                                 framework="framework" in self.profile.features):
                self.migrated.append(STEPS[self.migration_step][0])
            if self.migration_step == FRESH_STEP and mine:
                self.tables.append(schema.table("fresh"))
            self.migration_step += 1
            if self.on_migrated is not None:
                self.on_migrated(self.index)
