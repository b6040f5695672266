"""Facts about user tables that make invalidation precise: columns, the key writes and reads are
pinned by, foreign keys with their actions and columns, and the closure of a write.

A write `Effect` says what one statement changes in one table: its rows (INSERT, DELETE,
TRUNCATE: the row set), some columns of existing rows (UPDATE), or anything (`table`: reach
unknown). The closure adds what Postgres changes because of it (rules in `closure`):
partitions and inheritance children and parents, and foreign-key actions — an UPDATE that
assigns no referenced column cascades nowhere, an INSERT never does.

The key of a table is its primary key (else its first unique index over plain NOT NULL columns)
when every key column has a type whose values pgsluice can normalize exactly (integers, text
with a deterministic collation, uuid). Reads and writes pinned by equality on that key to
known values are the finest level of invalidation (see cache/deps.py). Uniqueness is not what
makes this sound — a pinned read depends only on the rows holding its key value, a pinned write
changes only those — but it is what makes pins common.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

INT_TYPES = frozenset({20, 21, 23})  # int8, int2, int4
TEXT_TYPES = frozenset({25, 1043})  # text, varchar
UUID_TYPE = 2950
KEY_TYPES = INT_TYPES | TEXT_TYPES | {UUID_TYPE}

ROWS_KINDS = frozenset({"insert", "delete", "truncate"})  # change the row set


@dataclass(frozen=True, slots=True)
class ForeignKey:
    referencing: str  # "schema.table" holding the foreign key
    columns: tuple[str, ...]  # its columns there
    referenced: str
    ref_columns: tuple[str, ...]
    on_delete: str  # pg_constraint.confdeltype: a no action, r restrict, c cascade, n set null, d default
    on_update: str


@dataclass(frozen=True, slots=True)
class TableInfo:
    columns: tuple[str, ...] = ()  # in attnum order (INSERT without a column list)
    types: Mapping[str, int] = field(default_factory=dict)  # column -> type oid
    key: tuple[str, ...] = ()  # the pinning key's columns ("" when none is usable)
    key_types: tuple[int, ...] = ()
    generated: frozenset[str] = frozenset()  # generated columns: any UPDATE may change them


@dataclass(frozen=True, slots=True)
class Effect:
    """What one statement changes in one table. `kind`: insert / delete / truncate / update /
    table; `columns`: for update, the columns assigned (None: any); `pin`: opaque for this
    module (the key values, see planner.reach.Pin), None when the rows are not known."""

    table: str
    kind: str
    columns: frozenset[str] | None = None
    pin: object = None


@dataclass(frozen=True, slots=True)
class TableFacts:
    tables: Mapping[str, TableInfo] = field(default_factory=dict)  # "schema.name" -> info
    referenced_by: Mapping[str, tuple[ForeignKey, ...]] = field(default_factory=dict)  # by referenced
    children: Mapping[str, frozenset[str]] = field(default_factory=dict)  # partitions, inheritors
    parents: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def info(self, qualified: str) -> TableInfo | None:
        return self.tables.get(qualified)

    def closure(self, effects: Iterable[Effect]) -> list[Effect]:
        """`effects` (first, as given) and everything Postgres changes because of them, with no
        pin. Rules: a write to a relation is the same write to its children (partitions,
        inheritors) and shows in its parents (not in their other children); a DELETE cascades as
        ON DELETE says (CASCADE deletes, SET NULL / SET DEFAULT update the foreign-key columns);
        an UPDATE that assigns a referenced column (or any, if unknown) cascades as ON UPDATE
        says; TRUNCATE may CASCADE to every referencing table; `table` (unknown) reaches all."""
        out = list(effects)
        # (table, kind, columns, going up): a pinned effect is not "seen" — the same write
        # caused elsewhere (a self-referencing cascade) reaches other rows
        seen: set[tuple[str, str, frozenset[str] | None, bool]] = set()
        stack = [(e.table, e.kind, e.columns, False) for e in out]
        while stack:
            table, kind, columns, up = stack.pop()
            caused = [(rel, kind, columns, True) for rel in self.parents.get(table, ())]
            if not up:
                caused += [(rel, kind, columns, False) for rel in self.children.get(table, ())]
            caused += [(e.table, e.kind, e.columns, False)
                       for fk in self.referenced_by.get(table, ()) for e in _cascade(fk, kind, columns)]
            for state in caused:
                if state not in seen:
                    seen.add(state)
                    out.append(Effect(state[0], state[1], state[2]))
                    stack.append(state)
        return [self._generated(e) for e in out]

    def _generated(self, effect: Effect) -> Effect:
        """An UPDATE of some columns may change every generated column of the table too."""
        info = self.tables.get(effect.table)
        if effect.kind != "update" or effect.columns is None or info is None or not info.generated:
            return effect
        return Effect(effect.table, effect.kind, effect.columns | info.generated, effect.pin)

    def related(self, qualified: str) -> frozenset[str]:
        """Relations a write to `qualified` also shows in: its children, transitively, and its
        parents, transitively."""
        out: set[str] = set()
        for links in (self.children, self.parents):
            stack = [qualified]
            while stack:
                for rel in links.get(stack.pop(), ()):
                    if rel not in out and rel != qualified:
                        out.add(rel)
                        stack.append(rel)
        return frozenset(out)


def _cascade(fk: ForeignKey, kind: str, columns: frozenset[str] | None) -> list[Effect]:
    fk_cols = frozenset(fk.columns)
    if kind == "table":
        return [Effect(fk.referencing, "table")]
    if kind == "truncate":
        return [Effect(fk.referencing, "truncate")]
    if kind == "delete":
        if fk.on_delete == "c":
            return [Effect(fk.referencing, "delete")]
        if fk.on_delete in ("n", "d"):
            return [Effect(fk.referencing, "update", fk_cols)]
        return []
    if kind == "update" and fk.on_update in ("c", "n", "d") and (
            columns is None or not columns.isdisjoint(fk.ref_columns)):
        return [Effect(fk.referencing, "update", fk_cols)]
    return []


# ---- loading --------------------------------------------------------------------------------------

_USER = "n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname !~ '^pg_toast'"
COLUMNS = f"""
SELECT n.nspname, c.relname, a.attname, a.atttypid::int, a.attgenerated::text,
       coalesce(co.collisdeterministic, true) AS deterministic
FROM pg_catalog.pg_attribute a
JOIN pg_catalog.pg_class c ON c.oid = a.attrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_catalog.pg_collation co ON co.oid = a.attcollation
WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p', 'f') AND {_USER}
ORDER BY c.oid, a.attnum
"""
# Primary keys first, then unique indexes over plain columns (no expression, no predicate).
KEYS = f"""
SELECT n.nspname, c.relname, i.indisprimary,
       array_agg(a.attname ORDER BY k.ord) AS cols, bool_and(a.attnotnull) AS notnull
FROM pg_catalog.pg_index i
JOIN pg_catalog.pg_class c ON c.oid = i.indrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, ord)
JOIN pg_catalog.pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum
WHERE i.indisunique AND i.indisvalid AND i.indpred IS NULL AND i.indexprs IS NULL
  AND c.relkind IN ('r', 'p') AND {_USER}
GROUP BY n.nspname, c.relname, i.indexrelid, i.indisprimary
ORDER BY n.nspname, c.relname, i.indisprimary DESC, i.indexrelid
"""
FOREIGN_KEYS = """
SELECT tn.nspname, t.relname, fn.nspname, f.relname, k.confdeltype::text, k.confupdtype::text,
       ARRAY(SELECT a.attname FROM unnest(k.conkey) WITH ORDINALITY u(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.conrelid AND a.attnum = u.n ORDER BY u.o),
       ARRAY(SELECT a.attname FROM unnest(k.confkey) WITH ORDINALITY u(n, o)
             JOIN pg_catalog.pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = u.n ORDER BY u.o)
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class f ON f.oid = k.confrelid JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
JOIN pg_catalog.pg_class t ON t.oid = k.conrelid JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
WHERE k.contype = 'f'
"""


def _schema(name: str) -> str:
    return "pg_temp" if name.startswith("pg_temp_") else name


async def load_tables(conn: asyncpg.Connection,
                      inherits: Iterable[asyncpg.Record]) -> TableFacts:
    """Read the table facts over `conn` (inside the caller's snapshot). `inherits`: rows of
    (child schema, child, parent schema, parent) from pg_inherits."""
    columns: dict[str, list[tuple[str, int, str, bool]]] = {}
    for schema, table, column, type_oid, generated, deterministic in await conn.fetch(COLUMNS):
        columns.setdefault(f"{_schema(schema)}.{table}", []).append(
            (column, type_oid, generated, deterministic))
    keys: dict[str, tuple[str, ...]] = {}
    for schema, table, primary, cols, notnull in await conn.fetch(KEYS):
        qualified = f"{_schema(schema)}.{table}"
        if qualified not in keys and (primary or notnull):
            keys[qualified] = tuple(cols)
    tables: dict[str, TableInfo] = {}
    for qualified, cols in columns.items():
        types = {name: oid for name, oid, _, _ in cols}
        deterministic = {name for name, _, _, det in cols if det}
        key = keys.get(qualified, ())
        usable = bool(key) and all(
            types.get(k) in KEY_TYPES and (types[k] not in TEXT_TYPES or k in deterministic) for k in key)
        tables[qualified] = TableInfo(
            columns=tuple(name for name, _, _, _ in cols), types=types,
            key=key if usable else (), key_types=tuple(types[k] for k in key) if usable else (),
            generated=frozenset(name for name, _, gen, _ in cols if gen))
    referenced_by: dict[str, list[ForeignKey]] = {}
    for row in await conn.fetch(FOREIGN_KEYS):
        t_schema, t_name, f_schema, f_name, on_delete, on_update, cols, ref_cols = row
        fk = ForeignKey(f"{_schema(t_schema)}.{t_name}", tuple(cols), f"{_schema(f_schema)}.{f_name}",
                        tuple(ref_cols), on_delete, on_update)
        referenced_by.setdefault(fk.referenced, []).append(fk)
    children: dict[str, set[str]] = {}
    parents: dict[str, set[str]] = {}
    for c_schema, c_name, p_schema, p_name in inherits:
        child, parent = f"{_schema(c_schema)}.{c_name}", f"{_schema(p_schema)}.{p_name}"
        children.setdefault(parent, set()).add(child)
        parents.setdefault(child, set()).add(parent)
    return TableFacts(tables, {k: tuple(v) for k, v in referenced_by.items()},
                      {k: frozenset(v) for k, v in children.items()},
                      {k: frozenset(v) for k, v in parents.items()})
