"""The application's schema as objects, and the DDL that turns one schema into another.

A sidecar never sees the application's statements, only their result in ``sqlite_schema``. So a
schema change is described by the objects it changed (each one's ``CREATE`` text before and
after), and replayed by statements derived from that difference: ``CREATE``/``DROP`` for whole
objects; for a table whose text changed, ``ALTER TABLE … ADD/DROP/RENAME COLUMN`` or ``RENAME
TO`` when one of them gives exactly the new text, otherwise a rebuild (rename the old table
aside, create the new one from its exact text, copy the columns both have, drop the old).

Every plan is checked before it is used: it is run against an in-memory database holding the
starting schema, and the schema it ends with must be the target, object by object and character
by character. A plan that does not reach the target (or that SQLite refuses there: a virtual
table module or a collation this process lacks) raises :class:`PlanError`: the change is
refused, never half-applied.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from harmonylite.cdc import ddl
from harmonylite.cdc.catalogue import catalogue
from harmonylite.db.connection import PREFIX, quote_ident

REBUILD = f"{PREFIX}rebuild"
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
KINDS = ("table", "index", "view", "trigger")


class PlanError(Exception):
    """No statements reproduce the target schema here (the reason says why)."""


@dataclass(frozen=True)
class Obj:
    type: str
    name: str
    tbl_name: str
    sql: str

    def as_list(self) -> list[str]:
        return [self.type, self.name, self.tbl_name, self.sql]


# name -> object, in the order SQLite lists them (creation order: dependencies first).
Objects = dict[str, Obj]


def objects(conn: sqlite3.Connection) -> Objects:
    """The application's schema objects: harmonylite's own, SQLite's internal ones, the shadow
    tables of virtual tables (their module creates them) and automatic indexes left out."""
    kinds = catalogue(conn)
    skip = set(kinds.shadow) | set(kinds.internal)
    out: Objects = {}
    for typ, name, tbl, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema ORDER BY rowid"):
        name, tbl = str(name), str(tbl)
        if sql is None or typ not in KINDS or name.startswith(PREFIX) \
                or name.startswith("sqlite_") or name in skip or tbl in skip:
            continue
        out[name] = Obj(str(typ), name, tbl, str(sql))
    return out


def schema_hash(objs: Objects) -> str:
    text = json.dumps(sorted(o.as_list() for o in objs.values()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def scratch(objs: Objects) -> sqlite3.Connection:
    """An in-memory database holding ``objs`` (and harmonylite's base tables, which guarded
    triggers name). Raises PlanError when SQLite here refuses one of them."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for stmt in ddl.BASE_DDL:
        conn.execute(stmt)
    for o in sorted(objs.values(), key=lambda o: KINDS.index(o.type)):
        try:
            conn.execute(o.sql)
        except sqlite3.Error as exc:
            conn.close()
            raise PlanError(f"{o.type} {o.name!r} cannot be created by harmonylite's SQLite "
                            f"({exc})") from exc
    return conn


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, bool, bool, str]]:
    """(name, stored in the row, NOT NULL without default, declared type) per column."""
    return [(str(r[1]), int(r[6]) in (0, 1), bool(r[3]) and r[4] is None, str(r[2] or ""))
            for r in conn.execute(f"PRAGMA table_xinfo({quote_ident(table)})")]


def _placeholder(decl: str) -> str:
    """A value for a new NOT NULL column a copy has none for (the origin republishes the
    rebuilt rows, which replace it)."""
    upper = decl.upper()
    if "CHAR" in upper or "CLOB" in upper or "TEXT" in upper:
        return "''"
    if "BLOB" in upper or not upper:
        return "x''"
    return "0"


class _Planner:
    def __init__(self, current: Objects, target: Objects) -> None:
        self.db = scratch(current)
        self.target = target
        self.tgt = scratch(target)
        self.stmts: list[str] = []

    def close(self) -> None:
        self.db.close()
        self.tgt.close()

    def now(self) -> Objects:
        return objects(self.db)

    def run(self, sql: str) -> None:
        try:
            self.db.execute(sql)
        except sqlite3.Error as exc:
            raise PlanError(f"{sql!r} fails: {exc}") from exc
        self.stmts.append(sql)

    def attempt(self, stmts: list[str], ok: Callable[[], bool]) -> bool:
        """Run ``stmts``; keep them when ``ok()`` says they reached what was wanted."""
        self.db.execute("SAVEPOINT attempt")
        try:
            for s in stmts:
                self.db.execute(s)
            good = ok()
        except sqlite3.Error:
            good = False
        if good:
            self.db.execute("RELEASE attempt")
            self.stmts.extend(stmts)
            return True
        self.db.execute("ROLLBACK TO attempt")
        self.db.execute("RELEASE attempt")
        return False

    def plan(self) -> list[str]:
        target = self.target
        cur = self.now()
        # Views and triggers that change are created again at the end (they may name tables
        # about to change); indexes that change, too.
        for o in reversed(cur.values()):
            if o.type != "table" and target.get(o.name) != o:
                self.run(f"DROP {o.type.upper()} {quote_ident(o.name)}")
        self._renames()
        cur = self.now()
        for name, o in cur.items():
            want = target.get(name)
            if o.type == "table" and want is not None and want.type == "table" and want != o:
                self._change_table(o, want)
        cur = self.now()
        for o in target.values():
            if o.type == "table" and o.name not in cur:
                self.run(o.sql)
        for o in reversed(list(self.now().values())):
            if o.type == "table" and o.name not in target:
                self.run(f"DROP TABLE {quote_ident(o.name)}")
        cur = self.now()
        for o in target.values():
            if o.type != "table" and cur.get(o.name) != o:
                if o.name in cur:
                    self.run(f"DROP {cur[o.name].type.upper()} {quote_ident(o.name)}")
                self.run(o.sql)
        reached = self.now()
        if reached != target:
            wrong = sorted(n for n in set(reached) | set(target)
                           if reached.get(n) != target.get(n))
            raise PlanError("no statements found that give exactly the new definition of "
                            + ", ".join(map(repr, wrong)))
        return self.stmts

    def _renames(self) -> None:
        """Tables gone whose content reappears under a new name: ``RENAME TO``."""
        cur = self.now()
        gone = [o for o in cur.values() if o.type == "table" and o.name not in self.target]
        new = [o for o in self.target.values() if o.type == "table" and o.name not in cur]
        for old in gone:
            for want in new:
                def arrived(w: Obj = want) -> bool:
                    return self.now().get(w.name) == w

                if any(self.attempt([f"ALTER TABLE {quote_ident(old.name)} RENAME TO "
                                     f"{spell(want.name)}"], arrived)
                       for spell in (quote_ident, _bare)):
                    new.remove(want)
                    break

    def _change_table(self, old: Obj, want: Obj) -> None:
        q = quote_ident(old.name)
        if "VIRTUAL" in (old.sql[:16] + want.sql[:16]).upper():
            # A virtual table is its module's: made again (its module fills it, or the
            # application's triggers do).
            self.run(f"DROP TABLE {q}")
            self.run(want.sql)
            return
        before = _columns(self.db, old.name)
        after = _columns(self.tgt, want.name)
        names_b, names_a = [c[0] for c in before], [c[0] for c in after]
        tries: list[list[str]] = []
        added = _added_column(old.sql, want.sql)
        if added:
            tries.append([f"ALTER TABLE {q} ADD COLUMN {added}"])
        if len(names_a) < len(names_b) and [n for n in names_b if n in names_a] == names_a:
            tries.append([f"ALTER TABLE {q} DROP COLUMN {quote_ident(n)}"
                          for n in names_b if n not in names_a])
        if len(names_a) == len(names_b) and names_a != names_b:
            # SQLite writes the new name as the statement spells it: quoted, or not.
            for spell in (quote_ident, _bare):
                tries.append([f"ALTER TABLE {q} RENAME COLUMN {quote_ident(b)} TO {spell(a)}"
                              for b, a in zip(names_b, names_a, strict=True) if a != b])
        for stmts in tries:
            if self.attempt(stmts, lambda: self.now().get(want.name) == want):
                return
        stored_b = {c[0] for c in before if c[1]}
        copy = [c[0] for c in after if c[1] and c[0] in stored_b]
        fill = [(c[0], _placeholder(c[3])) for c in after
                if c[1] and c[2] and c[0] not in stored_b]
        cols = ", ".join(quote_ident(c) for c in copy + [n for n, _ in fill])
        vals = ", ".join([quote_ident(c) for c in copy] + [v for _, v in fill])
        for stmt in ("PRAGMA legacy_alter_table = ON",
                     f"ALTER TABLE {q} RENAME TO {quote_ident(REBUILD)}",
                     want.sql,
                     f"INSERT INTO {q} ({cols}) SELECT {vals} FROM {quote_ident(REBUILD)}"
                     if cols else "SELECT 1",
                     f"DROP TABLE {quote_ident(REBUILD)}",
                     "PRAGMA legacy_alter_table = OFF"):
            self.run(stmt)


def _bare(name: str) -> str:
    return name if _IDENT.match(name) else quote_ident(name)


def _added_column(old: str, new: str) -> str:
    """The column definition ``ALTER TABLE … ADD COLUMN`` inserted into ``old`` to give
    ``new`` (SQLite writes ``, <definition>`` before the closing parenthesis), or ''."""
    if len(new) <= len(old):
        return ""
    p = 0
    while p < len(old) and old[p] == new[p]:
        p += 1
    s = 0
    while s < len(old) - p and old[-1 - s] == new[-1 - s]:
        s += 1
    if p + s != len(old):
        return ""
    middle = new[p:len(new) - s].strip()
    return middle[1:].strip() if middle.startswith(",") else ""


def plan(current: Objects, target: Objects) -> list[str]:
    """Statements that turn a database whose schema is ``current`` into ``target``; checked
    (see the module's docstring). Raises PlanError."""
    if current == target:
        return []
    planner = _Planner(current, target)
    try:
        return planner.plan()
    finally:
        planner.close()


def run_plan(conn: sqlite3.Connection, stmts: list[str]) -> None:
    """Run planned statements inside the caller's transaction."""
    for stmt in stmts:
        conn.execute(stmt)
