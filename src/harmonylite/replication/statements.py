"""The SQL that applies one change, per table and column set (cached by the applier).

Three kinds of table:

- **keyed** (a primary key that never holds NULL): one upsert,
  ``INSERT … ON CONFLICT(pk) DO UPDATE SET every column … WHERE the row differs``. Key columns
  are set too, so a key that compares equal under its collation (``'Key'`` and ``'KEY'`` with
  NOCASE) ends with the same bytes on every node; the differ test compares with ``COLLATE
  BINARY``; an upsert that changes nothing writes nothing (no page, no trigger).
- **nullable key** (SQLite lets a non-INTEGER key column of a rowid table hold NULL, which
  never matches ``ON CONFLICT`` or ``=``): look the row up with ``IS``, update or insert.
- **content** (no primary key): the whole row is the key; an insert adds a row, a delete removes
  one row with exactly those values.

Text that is not valid UTF-8 is bound as bytes and cast back to TEXT (``CAST(? AS TEXT)``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass

from harmonylite.cdc import ddl
from harmonylite.cdc.schema import TableInfo
from harmonylite.db.connection import RawText, quote_ident


def raw_mask(values: tuple[object, ...]) -> tuple[bool, ...] | None:
    """Which values are text that is not valid UTF-8 (None when none: the usual case)."""
    if RawText not in map(type, values):
        return None
    return tuple(type(v) is RawText for v in values)


def _mark(mask: tuple[bool, ...] | None, i: int) -> str:
    return "CAST(? AS TEXT)" if mask is not None and mask[i] else "?"


mark = _mark  # the parameter for the i-th value (text that is not UTF-8 bound as TEXT)


def _mark_n(mask: tuple[bool, ...] | None, i: int) -> str:
    return f"CAST(?{i + 1} AS TEXT)" if mask is not None and mask[i] else f"?{i + 1}"


def exact_match(columns: Sequence[str], mask: tuple[bool, ...] | None, first: int = 1) -> str:
    """SQL: each of ``columns`` holds exactly the value bound at numbered parameter ``first +
    i`` — byte-equal (whatever the column's collation) and of the same storage class. The
    content of a table without a primary key is its identity: ``IS`` alone finds ``0`` and
    ``0.0``, or ``'a'`` and ``'A'`` in a NOCASE column, equal, and a removal would take another
    content's row on one node and not on another. (A zero REAL of either sign is one content
    here: no SQL function tells ``-0.0`` from ``0.0``.)"""
    out = []
    for i, c in enumerate(columns):
        p = f"?{first + i}"
        v = f"CAST({p} AS TEXT)" if mask is not None and mask[i] else p
        out.append(f"{c} IS {v} COLLATE BINARY AND typeof({c}) = typeof({v})")
    return " AND ".join(out)


def _same(have: str, new: str) -> str:
    """SQL: the stored value ``have`` is exactly ``new`` — byte-equal text, the same storage
    class (``IS`` alone finds 0 and 0.0, or 1 and 1.0, equal). A zero REAL never counts as the
    same: ``-0.0 IS 0.0``, and no portable SQL function tells their signs apart, so such a value
    is written again (an idempotent write) rather than left with the wrong sign."""
    return (f"({have} IS {new} COLLATE BINARY AND typeof({have}) = typeof({new}) "
            f"AND NOT (typeof({have}) = 'real' AND {have} = 0))")


@dataclass(frozen=True)
class Statements:
    upsert: str = ""  # keyed tables
    exists: str = ""  # nullable key: is the row there?
    update: str = ""  # nullable key: values, then key
    insert: str = ""  # nullable key and content tables
    delete: str = ""  # binds the key
    insert_new: str = ""  # keyed tables, an INSERT: only if the key is free
    select_row: str = ""  # keyed tables, an INSERT: the row holding the key (every column)


def build(local: TableInfo, columns: tuple[str, ...], op: int,
          mask: tuple[bool, ...] | None, zero: tuple[bool, ...] | None = None) -> Statements:
    """Statements for a change of ``columns`` (a subset of the table's, in the sender's order).

    For a delete, ``mask`` covers the key values in key order; otherwise the column values.
    ``zero`` marks the values bound as a length and written as ``zeroblob`` (filled in later,
    see ``large_values``)."""
    t = quote_ident(local.name)
    if op == ddl.OP_DELETE:
        if local.content_keyed:  # equal rows may repeat: remove one of them
            exact = exact_match([quote_ident(c) for c in local.pk], mask)
            return Statements(delete=f"DELETE FROM {t} WHERE rowid = (SELECT rowid FROM {t} "
                                     f"WHERE {exact} LIMIT 1)")
        where = " AND ".join(f"{quote_ident(c)} IS {_mark(mask, i)}"
                             for i, c in enumerate(local.pk))
        return Statements(delete=f"DELETE FROM {t} WHERE {where}")
    names = ", ".join(quote_ident(c) for c in columns)
    marks = ", ".join("zeroblob(?)" if zero is not None and zero[i] else _mark(mask, i)
                      for i in range(len(columns)))
    insert = f"INSERT INTO {t}({names}) VALUES ({marks})"
    if local.content_keyed:
        return Statements(insert=insert)
    same = " AND ".join(_same(f"{t}.{quote_ident(c)}", f"excluded.{quote_ident(c)}")
                        for c in columns)
    if local.nullable_key:
        # Numbered parameters: the values (1..n) are bound once and used twice.
        n = len(columns)
        raw_key = [mask is not None and mask[columns.index(c)] for c in local.pk]
        where = " AND ".join(
            f"{quote_ident(c)} IS " + (f"CAST(?{n + 1 + j} AS TEXT)" if raw else f"?{n + 1 + j}")
            for j, (c, raw) in enumerate(zip(local.pk, raw_key, strict=True)))
        sets = ", ".join(f"{quote_ident(c)} = {_mark_n(mask, i)}" for i, c in enumerate(columns))
        differ = " AND ".join(_same(quote_ident(c), _mark_n(mask, i))
                              for i, c in enumerate(columns))
        return Statements(exists=f"SELECT 1 FROM {t} WHERE {where}",
                          update=f"UPDATE {t} SET {sets} WHERE {where} AND NOT ({differ})",
                          insert=insert)
    conflict = ", ".join(quote_ident(c) for c in local.pk)
    sets = ", ".join(f"{quote_ident(c)} = excluded.{quote_ident(c)}" for c in columns)
    upsert = f"{insert} ON CONFLICT({conflict}) DO UPDATE SET {sets} WHERE NOT ({same})"
    if op != ddl.OP_INSERT:
        return Statements(upsert=upsert)
    # An INSERT may meet a row its sender never saw (two nodes inserted the same new key): the
    # applier first tries the key, and records the row it then overwrites (see conflicts).
    key_at = [columns.index(c) for c in local.pk] if all(c in columns for c in local.pk) else []
    where = " AND ".join(f"{quote_ident(c)} IS {_mark(mask, i)}"
                         for c, i in zip(local.pk, key_at, strict=False))
    all_cols = ", ".join(quote_ident(c) for c in local.columns)
    return Statements(upsert=upsert, insert_new=f"{insert} ON CONFLICT DO NOTHING",
                      select_row=f"SELECT {all_cols} FROM {t} WHERE {where}" if key_at else "")


def run(conn: sqlite3.Connection, local: TableInfo, st: Statements, columns: tuple[str, ...],
        values: tuple[object, ...], key: tuple[object, ...]) -> None:
    """Execute a change built by :func:`build` (``key`` in the table's key order)."""
    if st.delete:
        conn.execute(st.delete, key)
    elif st.upsert:
        conn.execute(st.upsert, values)
    elif st.exists:
        if conn.execute(st.exists, (*values, *key)).fetchone():
            conn.execute(st.update, (*values, *key))
        else:
            conn.execute(st.insert, values)
    else:
        conn.execute(st.insert, values)
