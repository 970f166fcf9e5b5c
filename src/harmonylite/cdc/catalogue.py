"""What kind each table of the database is, as SQLite knows it: ordinary, virtual, shadow, internal.

Shadow tables (the ``_data``, ``_idx``… tables an FTS5 index keeps its index in) belong to their
virtual table, which writes them itself: they are never captured. Which tables they are is asked
of SQLite (``PRAGMA table_list``, whose ``type`` column says ``shadow`` and ``virtual``), never
guessed from a name: an ordinary table ``notes_meta`` beside an FTS5 table ``notes`` is the
application's own and is replicated. SQLite before 3.37 has no ``table_list``; there a table is a
shadow table when SQLite itself would call it one: named ``<virtual table>_<suffix>`` with a
suffix the virtual table's module claims (FTS3/4/5, R*Tree and Geopoly's ``xShadowName``).
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass, field

from harmonylite.db.connection import PREFIX

# SQLite's own tables that table_list reports but that are the schema itself.
_CATALOGUE_TABLES = frozenset({"sqlite_schema", "sqlite_master", "sqlite_temp_schema",
                               "sqlite_temp_master"})
# The shadow tables each built-in module creates (SQLite's xShadowName of each module).
SHADOW_SUFFIXES: dict[str, tuple[str, ...]] = {
    "fts3": ("content", "segments", "segdir", "docsize", "stat"),
    "fts4": ("content", "segments", "segdir", "docsize", "stat"),
    "fts5": ("data", "idx", "content", "docsize", "config"),
    "rtree": ("node", "parent", "rowid"),
    "rtree_i32": ("node", "parent", "rowid"),
    "geopoly": ("node", "parent", "rowid"),
}
FTS_MODULES = frozenset({"fts3", "fts4", "fts5"})
_USING = re.compile(r"\bUSING\s+([A-Za-z_][A-Za-z0-9_]*)", re.IGNORECASE)
HAS_TABLE_LIST = sqlite3.sqlite_version_info >= (3, 37, 0)


@dataclass
class Catalogue:
    ordinary: list[str] = field(default_factory=list)  # tables that can carry triggers
    virtual: dict[str, str] = field(default_factory=dict)  # name -> module (lower case)
    shadow: dict[str, str] = field(default_factory=dict)  # name -> its virtual table
    internal: list[str] = field(default_factory=list)  # SQLite's own (sqlite_sequence…)


def module_of(sql: str | None) -> str:
    m = _USING.search(sql or "")
    return m.group(1).lower() if m else ""


def _is_ours(name: str) -> bool:
    return name.startswith(PREFIX)


def catalogue(conn: sqlite3.Connection, *, table_list: bool = HAS_TABLE_LIST) -> Catalogue:
    """Every table of the main database by kind (harmonylite's own left out), sorted by name."""
    rows = conn.execute(
        "SELECT name, sql FROM sqlite_master WHERE type = 'table' ORDER BY name").fetchall()
    sql_of = {str(n): (str(s) if s is not None else None) for n, s in rows}
    out = Catalogue()
    if table_list:
        kinds = {str(r[1]): str(r[2]) for r in conn.execute("PRAGMA main.table_list")}
    else:
        kinds = {n: ("virtual" if (s or "").lstrip().upper().startswith("CREATE VIRTUAL")
                     else "table") for n, s in sql_of.items()}
    for name in sorted(kinds):
        if _is_ours(name) or name in _CATALOGUE_TABLES:
            continue
        if kinds[name] == "virtual":
            out.virtual[name] = module_of(sql_of.get(name))
    for name in sorted(kinds):
        kind = kinds[name]
        if _is_ours(name) or name in _CATALOGUE_TABLES or kind == "virtual":
            continue
        if kind == "shadow":
            out.shadow[name] = _owner(name, out.virtual)
        elif not table_list and (owner := _fallback_owner(name, out.virtual)):
            out.shadow[name] = owner
        elif name.startswith("sqlite_"):
            out.internal.append(name)
        elif kind == "table":
            out.ordinary.append(name)
    return out


def _owner(shadow: str, virtual: dict[str, str]) -> str:
    """The virtual table a shadow table belongs to (its name is ``<owner>_<suffix>``; the longest
    such owner, should two virtual tables' names both fit)."""
    owners = [v for v in virtual if shadow.startswith(f"{v}_")]
    return max(owners, key=len) if owners else ""


def _fallback_owner(name: str, virtual: dict[str, str]) -> str:
    """Without table_list: the virtual table whose module creates exactly this table."""
    for owner, module in virtual.items():
        if name.startswith(f"{owner}_") and name[len(owner) + 1:] in SHADOW_SUFFIXES.get(
                module, ()):
            return owner
    return ""
