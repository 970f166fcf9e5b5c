"""The seeded schema: every table the workload writes, tagged by the feature that needs it.

Each table says which columns identify a row for the oracle (``key``) and which columns hold
values the application wrote (``checked``); columns filled by the application's own triggers
(``updated_at``) are compared between nodes but are not part of the write history.
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Table:
    name: str
    ddl: tuple[str, ...]
    key: tuple[str, ...]  # the row's identity for the oracle (the PK, or a unique pair)
    checked: tuple[str, ...]  # columns whose committed values the history records
    feature: str
    has_pk: bool = True
    nocase_key: bool = False  # key compared under NOCASE (ASCII case folding)
    extra: tuple[str, ...] = field(default=())  # more DDL (indexes, triggers) run after `ddl`
    initial: bool = True  # False: created by a migration during the run


TABLES: tuple[Table, ...] = (
    Table("kv", ("CREATE TABLE kv(id INTEGER PRIMARY KEY, v, n INTEGER, t TEXT)",),
          ("id",), ("id", "v", "n", "t"), "basic"),
    Table("pair", ("CREATE TABLE pair(a INTEGER NOT NULL, b TEXT NOT NULL, v, "
                   "PRIMARY KEY(a, b))",), ("a", "b"), ("a", "b", "v"), "basic"),
    Table("wr", ("CREATE TABLE wr(k TEXT PRIMARY KEY, v, n INTEGER) WITHOUT ROWID",),
          ("k",), ("k", "v", "n"), "basic"),
    Table("users", ("CREATE TABLE users(id INTEGER PRIMARY KEY, email TEXT UNIQUE, v)",),
          ("id",), ("id", "email", "v"), "unique"),
    Table("tags", ("CREATE TABLE tags(name TEXT COLLATE NOCASE PRIMARY KEY, v, n INTEGER)",),
          ("name",), ("name", "v", "n"), "nocase", nocase_key=True),
    Table("parent", ("CREATE TABLE parent(id INTEGER PRIMARY KEY, v)",),
          ("id",), ("id", "v"), "fk"),
    Table("child", ("CREATE TABLE child(id INTEGER PRIMARY KEY, "
                    "pid INTEGER REFERENCES parent(id) ON DELETE CASCADE, v)",),
          ("id",), ("id", "pid", "v"), "fk"),
    Table("events", ("CREATE TABLE events(origin INTEGER, n INTEGER, v)",),
          ("origin", "n"), ("origin", "n", "v"), "nopk", has_pk=False),
    Table("docs", ("CREATE TABLE docs(id INTEGER PRIMARY KEY, body, updated_at TEXT)",),
          ("id",), ("id", "body"), "triggers",
          extra=(
              "CREATE TABLE audit(id TEXT PRIMARY KEY, doc_id INTEGER, action TEXT)",
              "CREATE TRIGGER docs_audit_ins AFTER INSERT ON docs BEGIN "
              "INSERT INTO audit VALUES (lower(hex(randomblob(8))), NEW.id, 'insert'); END",
              "CREATE TRIGGER docs_audit_upd AFTER UPDATE OF body ON docs BEGIN "
              "INSERT INTO audit VALUES (lower(hex(randomblob(8))), NEW.id, 'update'); "
              "UPDATE docs SET updated_at = strftime('%Y-%m-%d %H:%M:%f', 'now') "
              "WHERE id = NEW.id; END",
          )),
    # A full-text index kept by the application's triggers (FTS5 external content, as in
    # SQLite's documentation): the index is no replicated table; every node derives its own.
    Table("articles", ("CREATE TABLE articles(id INTEGER PRIMARY KEY, body TEXT)",),
          ("id",), ("id", "body"), "fts",
          extra=(
              "CREATE VIRTUAL TABLE articles_fts USING fts5(body, content='articles', "
              "content_rowid='id')",
              "CREATE TRIGGER articles_ai AFTER INSERT ON articles BEGIN "
              "INSERT INTO articles_fts(rowid, body) VALUES (new.id, new.body); END",
              "CREATE TRIGGER articles_ad AFTER DELETE ON articles BEGIN "
              "INSERT INTO articles_fts(articles_fts, rowid, body) "
              "VALUES ('delete', old.id, old.body); END",
              "CREATE TRIGGER articles_au AFTER UPDATE ON articles BEGIN "
              "INSERT INTO articles_fts(articles_fts, rowid, body) "
              "VALUES ('delete', old.id, old.body); "
              "INSERT INTO articles_fts(rowid, body) VALUES (new.id, new.body); END",
          )),
    Table("mig", ("CREATE TABLE mig(id INTEGER PRIMARY KEY, a, b)",),
          ("id",), ("id",), "schema"),
    Table("fresh", ("CREATE TABLE fresh(id INTEGER PRIMARY KEY, v)",),
          ("id",), ("id", "v"), "schema", initial=False),
)

# Tables only written by triggers or created during the run: compared between nodes only.
DERIVED = ("audit",)
# Full-text indexes (virtual tables, not compared as tables): each node's must pass FTS5's
# integrity-check against its content table and answer MATCH alike (oracle.check_indexes).
FTS_INDEXES = ("articles_fts",)
WORDS = ("fox", "dog", "cat", "owl", "elk", "yak", "emu", "gnu")


# What a framework keeps beside the application's tables (profile ``framework``): which
# migrations this database applied — per node, never replicated (harmonylite's default
# ``exclude_tables``) — and rows every node's migrate creates (Django's content types: an
# auto-increment id, UNIQUE by name, created when missing).
BOOKKEEPING = "django_migrations"
FRAMEWORK_DDL = (
    f"CREATE TABLE {BOOKKEEPING}(id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, "
    "name TEXT NOT NULL, applied TEXT NOT NULL)",
    "CREATE TABLE fw_content_type(id INTEGER PRIMARY KEY AUTOINCREMENT, app_label TEXT NOT NULL, "
    "model TEXT NOT NULL, UNIQUE(app_label, model))",
)
PER_NODE = (BOOKKEEPING,)  # compared per node by their own invariant, not between nodes


def tables_for(features: frozenset[str]) -> list[Table]:
    return [t for t in TABLES if t.feature in features or t.feature == "basic"]


def table(name: str) -> Table:
    for t in TABLES:
        if t.name == name:
            return t
    raise KeyError(name)


def create_schema(db: sqlite3.Connection, features: frozenset[str]) -> None:
    for t in tables_for(features):
        if not t.initial:
            continue
        for stmt in (*t.ddl, *t.extra):
            db.execute(stmt)
    if "framework" in features:
        for stmt in FRAMEWORK_DDL:
            db.execute(stmt)


def user_tables(db: sqlite3.Connection) -> list[str]:
    """Ordinary tables only: virtual tables and their shadow tables (an FTS index's segments,
    laid out by each node's own merge history) are judged by what they answer instead."""
    rows = db.execute(
        "SELECT name FROM pragma_table_list WHERE schema = 'main' AND type = 'table' "
        "AND name NOT LIKE 'sqlite_%' "
        "AND name NOT LIKE '\\_\\_harmonylite\\_\\_%' ESCAPE '\\' ORDER BY name"
    ).fetchall()
    return [str(r[0]) for r in rows]


def columns(db: sqlite3.Connection, name: str) -> list[str]:
    return [str(r[1]) for r in db.execute(f'PRAGMA table_info("{name}")').fetchall()]


# --- byte-exact value encoding -------------------------------------------------------------

def select_exact(cols: list[str] | tuple[str, ...]) -> str:
    """SELECT list giving, per column, its storage class and an exact representation."""
    parts = []
    for c in cols:
        q = '"' + c.replace('"', '""') + '"'
        parts.append(f"typeof({q}), CASE typeof({q}) WHEN 'real' THEN {q} "
                     f"WHEN 'integer' THEN {q} ELSE hex({q}) END")
    return ", ".join(parts)


def encode_row(raw: tuple[object, ...] | list[object]) -> tuple[str, ...]:
    """Turn the pairs produced by ``select_exact`` into canonical strings (long ones hashed)."""
    out = []
    for i in range(0, len(raw), 2):
        kind, val = raw[i], raw[i + 1]
        if kind == "null":
            out.append("null")
        elif kind == "real":
            assert isinstance(val, float)
            out.append(f"real:{val.hex()}")
        elif kind == "integer":
            out.append(f"integer:{val}")
        else:
            text = str(val)
            if len(text) > 96:
                digest = hashlib.sha256(text.encode()).hexdigest()[:16]
                text = f"{text[:32]}…sha256={digest},{len(text) // 2}B"
            out.append(f"{kind}:x'{text}'")
    return tuple(out)


def fold_key(values: tuple[str, ...], nocase: bool) -> tuple[str, ...]:
    """Row identity under the key's collation (NOCASE folds ASCII A-Z only)."""
    if not nocase:
        return values
    folded = []
    for v in values:
        if v.startswith("text:x'"):
            raw = bytes.fromhex(v[7:-1]) if "…" not in v else v.encode()
            v = "text:x'" + bytes(b + 32 if 65 <= b <= 90 else b for b in raw).hex().upper() + "'"
        folded.append(v)
    return tuple(folded)


def pretty(v: str) -> str:
    """A readable form of an encoded value for failure reports."""
    if v.startswith(("text:x'", "blob:x'")) and "…" not in v:
        raw = bytes.fromhex(v[7:-1])
        if v.startswith("text") and len(raw) <= 40:
            try:
                return repr(raw.decode())
            except UnicodeDecodeError:
                return f"text{raw!r}"
        return f"{v[:5]}x'{raw[:20].hex()}{'…' if len(raw) > 20 else ''}'({len(raw)}B)"
    return v
