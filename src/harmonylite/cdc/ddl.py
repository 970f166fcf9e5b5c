"""Pure DDL for change capture. Every object it names starts with ``__harmonylite__``.

Layout (one insert per captured row change, which keeps the trigger cheap):

- ``__harmonylite__log(id INTEGER PRIMARY KEY, tid, op, k0, k1, …)``: one row per change, for
  every table: which table, which operation, and the row's key (``k0…`` in primary-key order,
  declared without a type so SQLite keeps each value exactly). The triggers name only key
  columns, so the application can add, rename and drop its other columns freely, and the
  publisher reads the row as it is when it publishes (DESIGN rule 17): a change captured before a
  schema change is sent with the row's columns of now, never shifted. The table grows key columns
  when a table with a wider key is captured. (Databases captured with the earlier layout, whole
  rows in ``c0…``, are converted on install.)
- ``__harmonylite__tables(tid, name, columns, pk)``: what ``tid`` means, the key columns that
  ``k0…`` hold, and the columns the table had when capture was last installed.
- ``__harmonylite__guard(applying)``: one row. The replicator sets ``applying = 1`` inside its own
  transaction and back to 0 before committing, so no other connection ever sees 1; triggers skip
  capture while it is 1 (the replicator's writes are not captured again). A missing row means
  "capture", never "skip".
- ``__harmonylite__state(k, v)``: the publish watermark (changes with id above it are pending) and
  the database's epoch.
- ``__harmonylite__seq(stream, seq)``: last applied sequence per stream, written in the applying
  transaction, so a snapshot copy knows exactly where it stands in the streams.
- ``__harmonylite__parked``: incoming changes to a table this database does not have (yet), in
  arrival order; applied once the table exists.
- ``__harmonylite__dead_letter``: incoming changes that can never be applied here as they are
  (malformed, a value out of range, a constraint that fails), with stream, sequence, origin,
  table, key, error and the change itself, so nothing is skipped without a record.
- ``__harmonylite__conflicts``: rows removed on this node because a change later in the
  stream's order took a UNIQUE value they held (see ``replication.conflicts``).
- ``__harmonylite__origins(origin, stream, hwm)``: per origin database and stream, the highest
  change id applied, written in the applying transaction: a batch sent again, however late, is
  not applied twice.
"""

from __future__ import annotations

from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import PREFIX, quote_ident, quote_literal

LOG = f"{PREFIX}log"
TABLES = f"{PREFIX}tables"
GUARD = f"{PREFIX}guard"
STATE = f"{PREFIX}state"
SEQ = f"{PREFIX}seq"
PARKED = f"{PREFIX}parked"
DEAD_LETTER = f"{PREFIX}dead_letter"
PREFIX_CONFLICTS = f"{PREFIX}conflicts"
ORIGINS = f"{PREFIX}origins"

OP_INSERT = 1
OP_UPDATE = 2
OP_DELETE = 3
# A row published because capture (re)started on its table (a new or rebuilt table), not because
# the application wrote it now: sent as an update, and never treated as a local change that
# supersedes incoming ones (see changelog.PendingKeys).
OP_BACKFILL = 4

BASE_DDL = [
    f"CREATE TABLE IF NOT EXISTS {LOG} (id INTEGER PRIMARY KEY, tid INTEGER NOT NULL, "
    "op INTEGER NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {TABLES} (tid INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, "
    "columns TEXT NOT NULL, pk TEXT NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {GUARD} (id INTEGER PRIMARY KEY CHECK (id = 1), "
    "applying INTEGER NOT NULL)",
    f"INSERT OR IGNORE INTO {GUARD}(id, applying) VALUES (1, 0)",
    f"CREATE TABLE IF NOT EXISTS {STATE} (k TEXT PRIMARY KEY, v) WITHOUT ROWID",
    f"INSERT OR IGNORE INTO {STATE}(k, v) VALUES ('published', 0)",
    f"CREATE TABLE IF NOT EXISTS {SEQ} (stream TEXT PRIMARY KEY, seq INTEGER NOT NULL) "
    "WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS {PARKED} (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
    "seq INTEGER NOT NULL, tbl TEXT NOT NULL, op INTEGER NOT NULL, columns TEXT NOT NULL, "
    "keys TEXT NOT NULL, vals BLOB NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {DEAD_LETTER} (id INTEGER PRIMARY KEY, stream TEXT NOT NULL, "
    "seq INTEGER NOT NULL, origin INTEGER, tbl TEXT, key TEXT, error TEXT NOT NULL, "
    "payload BLOB NOT NULL, created_at REAL NOT NULL)",
    f"CREATE TABLE IF NOT EXISTS {ORIGINS} (origin TEXT NOT NULL, stream TEXT NOT NULL, "
    "hwm INTEGER NOT NULL, PRIMARY KEY (origin, stream)) WITHOUT ROWID",
    f"CREATE TABLE IF NOT EXISTS {PREFIX_CONFLICTS} (id INTEGER PRIMARY KEY, "
    "tbl TEXT NOT NULL, key TEXT NOT NULL, columns TEXT NOT NULL, displaced BLOB NOT NULL, "
    "winner_origin INTEGER, winner_key TEXT, stream TEXT NOT NULL, seq INTEGER NOT NULL, "
    "created_at REAL NOT NULL, provisional INTEGER)",
]

GUARD_CLAUSE = f"WHEN (SELECT applying FROM {GUARD} WHERE id = 1) IS NOT 1"


def key_column(i: int) -> str:
    return f"k{i}"


def add_key_columns_ddl(have: int, need: int) -> list[str]:
    return [f"ALTER TABLE {LOG} ADD COLUMN {key_column(i)}" for i in range(have, need)]


def trigger_names(tid: int) -> list[str]:
    return [f"{PREFIX}t{tid}_{kind}" for kind in ("ins", "upd", "del")]


def _replaced_rows(tid: int, table: TableInfo, alias: str, exclude: tuple[str, ...]) -> str:
    """Statements logging a delete of each other row that holds a UNIQUE value of the row
    ``alias`` is about to write: the rows an ``OR REPLACE`` removes without firing delete
    triggers. Logged before the write; when no row is removed after all (the statement failed
    and rolled back, or ``OR IGNORE`` kept it), the publisher finds the row still there and
    sends it as it is."""
    keys = ", ".join(key_column(i) for i in range(len(table.pk)))
    cols = ", ".join(quote_ident(c) for c in table.pk)
    others = " AND ".join(
        f"NOT ({' AND '.join(f'{quote_ident(c)} IS {_ref(a, c)}' for c in table.pk)})"
        for a in exclude)
    out = []
    for index, colls in zip(table.unique_indexes, table.unique_collations, strict=False):
        if not index or len(colls) != len(index):
            continue  # an index on expressions: nothing to compare in a trigger
        same = " AND ".join(f"{quote_ident(c)} = {_ref(alias, c)} COLLATE {coll}"
                            for c, coll in zip(index, colls, strict=True))
        out.append(f"INSERT INTO {LOG}(tid, op, {keys}) SELECT {tid}, {OP_DELETE}, {cols} "
                   f"FROM {quote_ident(table.name)} WHERE {same} AND {others};")
    return " ".join(out)


def replace_trigger_ddl(tid: int, table: TableInfo) -> list[tuple[str, str]]:
    """(name, CREATE TRIGGER) of the triggers that capture the rows ``INSERT OR REPLACE`` and
    ``UPDATE OR REPLACE`` remove through a secondary UNIQUE constraint (SQLite fires no delete
    trigger for them unless ``recursive_triggers`` is on). Only tables with such a constraint
    and a primary key; they name the UNIQUE columns, which SQLite will not drop anyway."""
    if table.content_keyed:
        return []
    on_insert = _replaced_rows(tid, table, "NEW", ("NEW",))
    if not on_insert:
        return []
    unique_cols = sorted({c for index in table.unique_indexes for c in index})
    ins, upd = f"{PREFIX}t{tid}_rins", f"{PREFIX}t{tid}_rupd"
    tname = quote_ident(table.name)
    of = ", ".join(quote_ident(c) for c in unique_cols)
    return [
        (ins, f"CREATE TRIGGER {quote_ident(ins)} BEFORE INSERT ON {tname} {GUARD_CLAUSE} "
              f"BEGIN {on_insert} END"),
        (upd, f"CREATE TRIGGER {quote_ident(upd)} BEFORE UPDATE OF {of} ON {tname} "
              f"{GUARD_CLAUSE} BEGIN {_replaced_rows(tid, table, 'NEW', ('OLD', 'NEW'))} END"),
    ]


def _ref(alias: str, column: str) -> str:
    return f"{alias}.{quote_ident(column)}"


def trigger_ddl(tid: int, table: TableInfo) -> list[tuple[str, str]]:
    """(name, CREATE TRIGGER statement) of the three capture triggers of one table.

    They name only the key columns: SQLite rewrites them when a key column is renamed, and an
    application dropping or renaming any other column never trips over them.
    """
    ins, upd, dele = trigger_names(tid)
    tname = quote_ident(table.name)
    keys = ", ".join(key_column(i) for i in range(len(table.pk)))
    new_key = ", ".join(_ref("NEW", c) for c in table.pk)
    old_key = ", ".join(_ref("OLD", c) for c in table.pk)
    key_changed = " OR ".join(f"{_ref('OLD', c)} IS NOT {_ref('NEW', c)}" for c in table.pk)
    if table.content_keyed:
        # A table without a primary key: the key is the whole row, so an update is always the
        # old row removed and the new one added. (The triggers name every column here: such a
        # table cannot drop a column while captured; see docs/conflicts.md.)
        key_changed = "1"
    return [
        (ins, f"CREATE TRIGGER {quote_ident(ins)} AFTER INSERT ON {tname} {GUARD_CLAUSE} BEGIN "
              f"INSERT INTO {LOG}(tid, op, {keys}) VALUES ({tid}, {OP_INSERT}, {new_key}); END"),
        (upd, f"CREATE TRIGGER {quote_ident(upd)} AFTER UPDATE ON {tname} {GUARD_CLAUSE} BEGIN "
              # A changed key is a delete of the old key followed by an upsert of the new one.
              f"INSERT INTO {LOG}(tid, op, {keys}) SELECT {tid}, {OP_DELETE}, {old_key} "
              f"WHERE {key_changed}; "
              f"INSERT INTO {LOG}(tid, op, {keys}) VALUES ({tid}, {OP_UPDATE}, {new_key}); END"),
        (dele, f"CREATE TRIGGER {quote_ident(dele)} AFTER DELETE ON {tname} {GUARD_CLAUSE} "
               f"BEGIN INSERT INTO {LOG}(tid, op, {keys}) VALUES ({tid}, {OP_DELETE}, "
               f"{old_key}); END"),
    ]


def backfill_sql(tid: int, table: TableInfo) -> str:
    """Capture every current row of a table as an upsert (capture starting on a live table)."""
    keys = ", ".join(key_column(i) for i in range(len(table.pk)))
    cols = ", ".join(quote_ident(c) for c in table.pk)
    return (f"INSERT INTO {LOG}(tid, op, {keys}) SELECT {tid}, {OP_BACKFILL}, {cols} "
            f"FROM {quote_ident(table.name)}")


def table_registry_upsert(table: TableInfo, columns_json: str, pk_json: str) -> str:
    return (
        f"INSERT INTO {TABLES}(name, columns, pk) VALUES ({quote_literal(table.name)}, "
        f"{quote_literal(columns_json)}, {quote_literal(pk_json)}) ON CONFLICT(name) DO UPDATE SET "
        "columns = excluded.columns, pk = excluded.pk"
    )
