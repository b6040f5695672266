"""Facts from Postgres's catalog the planner decides with: which schema holds a relation (and
what kind of relation it is), how volatile a function is, what a view reads, and which
relations a write to another one also changes. Loaded with asyncpg when a database is first
used and reloaded after DDL; each load gets a new `generation`.

A `Catalog()` with no data is valid and means "nothing known": no name resolves, so no plan
that reads a table is cacheable until the real catalog is loaded. What is known of built-ins by
name alone, loaded or not, is in hazards.py.

Name resolution follows Postgres (namespace.c):
  * relations: the session's temporary schema first (unless `pg_temp` is listed in the path,
    then where it is listed), then `pg_catalog` (unless listed), then the search_path in order;
    `$user` is the session user's name; schemas that do not exist are skipped.
  * functions: the same without the temporary schema (Postgres never looks for functions
    there); an overloaded name counts as its most volatile overload, and a name that exists
    in several schemas on the path as the most volatile of them.
  * creation (CREATE TABLE x, SELECT INTO x): the first schema on the path that exists, or the
    temporary schema if the path lists `pg_temp` first.
The catalog is read over a connection of its own, so it cannot see the temporary tables of
the session that sends a query; a name that is a temporary table in *any* session counts as
temporary (conservative: such plans are never cacheable).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import asyncpg

from .plan import Flag
from .tables import TableFacts, load_tables

# ---- facts ----------------------------------------------------------------------------------------

VOLATILITY_ORDER = "isv"  # immutable < stable < volatile


@dataclass(frozen=True, slots=True)
class Function:
    volatility: str  # 'i', 's' or 'v': of the most volatile overload
    returns_set: bool = False  # some overload is set-returning
    aggregate: bool = False  # some overload is an aggregate


@dataclass(frozen=True, slots=True)
class Relation:
    kind: str  # pg_class.relkind: r table, p partitioned, v view, m matview, f foreign table, S sequence
    persistence: str = "p"  # p permanent, u unlogged, t temporary
    row_security: bool = False  # row-level security is enabled: policies may depend on the session


@dataclass(frozen=True, slots=True)
class View:
    """A user view: what it reads, through any views it reads (closed transitively, from
    pg_depend), and for a plain view its definition (pg_get_viewdef with every name outside
    pg_catalog qualified), which the analyzer reads for functions and the like: pg_depend
    does not record dependencies on built-in objects such as now(). A materialized view's
    rows change only with REFRESH: reading one does not read through it."""

    relations: frozenset[str] = frozenset()  # "schema.name" of the relations below it
    definition: str = ""
    materialized: bool = False


_generations = itertools.count(1)
_EMPTY_REL: Mapping[str, Relation] = {}


@dataclass(frozen=True, slots=True, eq=False)
class Catalog:
    """What Postgres said, frozen (safe to share between sessions): an empty Catalog means
    "nothing known". Build one with `await load(conn)` (or `Catalog.load`, `refresh`)."""

    functions: Mapping[str, Mapping[str, Function]] = field(default_factory=dict)  # name -> schema -> info
    relations: Mapping[str, Mapping[str, Relation]] = field(default_factory=dict)  # name -> schema -> info
    schemas: frozenset[str] = frozenset()
    views: Mapping[str, View] = field(default_factory=dict)  # "schema.view" -> what it reads
    # write op -> "schema.name" -> the other relations such a write changes (see also_written)
    write_effects: Mapping[str, Mapping[str, frozenset[str]]] = field(default_factory=dict)
    triggers: frozenset[str] = frozenset()  # "schema.name" of relations with user triggers or rules
    tables: TableFacts = field(default_factory=TableFacts)  # columns, keys, foreign keys (tables.py)
    generation: int = 0
    _paths: dict[tuple[tuple[str, ...], str], tuple[str, ...]] = field(default_factory=dict, repr=False)
    # the analyzer's verdict on each view's definition, computed on first use (see rules.Rules.read_view):
    # (why not cacheable, flags, functions)
    view_verdicts: dict[str, tuple[str, frozenset[Flag], frozenset[str]]] = field(default_factory=dict,
                                                                                    repr=False)

    # ---- loading ----

    @classmethod
    async def load(cls, conn: asyncpg.Connection) -> Catalog:
        return await load(conn)

    async def refresh(self, conn: asyncpg.Connection) -> Catalog:
        """A new Catalog read now (with a new generation); this one is unchanged."""
        return await load(conn)

    @property
    def loaded(self) -> bool:
        return bool(self.functions) or bool(self.relations)

    # ---- relations ----

    def relation_path(self, search_path: Iterable[str], user: str) -> tuple[str, ...]:
        """The schemas searched for an unqualified relation name, in order."""
        key = (tuple(search_path), user)
        path = self._paths.get(key)
        if path is None:
            out: list[str] = []
            for schema in key[0]:
                schema = user if schema == "$user" else schema
                if schema.startswith("pg_temp"):
                    schema = "pg_temp"
                if schema and schema not in out:
                    out.append(schema)
            if "pg_catalog" not in out:
                out.insert(0, "pg_catalog")
            if "pg_temp" not in out:
                out.insert(0, "pg_temp")
            path = tuple(out)
            if len(self._paths) > 1000:
                self._paths.clear()
            self._paths[key] = path
        return path

    def resolve(self, name: str, search_path: Iterable[str], user: str) -> str | None:
        """The schema an unqualified relation name resolves to ("pg_temp" for a temporary
        table), or None if no schema on the path has it."""
        by_schema = self.relations.get(name)
        if not by_schema:
            return None
        for schema in self.relation_path(search_path, user):
            if schema in by_schema:
                return schema
        return None

    def relation(self, schema: str, name: str) -> Relation | None:
        if schema.startswith("pg_temp"):
            schema = "pg_temp"
        return self.relations.get(name, _EMPTY_REL).get(schema)

    def creation_schema(self, search_path: Iterable[str], user: str) -> str | None:
        """Where CREATE TABLE / SELECT INTO put an unqualified name: the first schema on the
        path that exists ("pg_temp" if the path lists it first), None if unknown."""
        for schema in search_path:
            schema = user if schema == "$user" else schema
            if schema.startswith("pg_temp"):
                return "pg_temp"
            if schema in self.schemas:
                return schema
        return None

    def view(self, qualified: str) -> View | None:
        """The user view (plain or materialized) `qualified`, or None."""
        return self.views.get(qualified)

    def dependent_views(self, qualified: str) -> frozenset[str]:
        """The views and materialized views built on `qualified` (directly or through other
        views): what DROP ... CASCADE drops with it."""
        return frozenset(name for name, view in self.views.items() if qualified in view.relations)

    def relations_in(self, schema: str) -> frozenset[str]:
        """Every relation of a schema, as "schema.name" (what DROP SCHEMA ... CASCADE drops)."""
        return frozenset(f"{schema}.{name}" for name, by_schema in self.relations.items()
                         if schema in by_schema)

    def also_written(self, qualified: str, op: str = "any") -> frozenset[str]:
        """Relations a write to `qualified` may change too. `op` is the kind of write: "insert"
        (also COPY FROM, new tables), "update" (also INSERT ... ON CONFLICT DO UPDATE),
        "delete", "merge", "truncate", "ddl", or "any" (all of them). Partitions and
        inheritance: a write through a parent lands in its children, and what a changed
        relation holds shows in its parents (siblings are not affected). Foreign keys: rows
        an ON DELETE / ON UPDATE action changes land in the referencing table; TRUNCATE ...
        CASCADE reaches every referencing table. Closed transitively."""
        by_op = self.write_effects.get(op)
        return by_op.get(qualified, frozenset()) if by_op is not None else frozenset()

    # ---- functions ----

    def function(self, name: str, schema: str | None, search_path: Iterable[str],
                 user: str) -> tuple[str | None, Function | None]:
        """(schema, facts) for a function call: an explicit schema as given; an unqualified
        name through pg_catalog and the search_path (never pg_temp), reporting the first
        schema that has it and the most volatile of all the schemas on the path that do."""
        by_schema = self.functions.get(name)
        if not by_schema:
            return schema, None
        if schema is not None:
            return schema, by_schema.get(schema)
        found: str | None = None
        worst: Function | None = None
        for candidate in self.relation_path(search_path, user):
            info = by_schema.get(candidate) if candidate != "pg_temp" else None
            if info is None:
                continue
            if found is None or worst is None:
                found, worst = candidate, info
            else:
                worst = Function(info.volatility if _more_volatile(info, worst) else worst.volatility,
                                 worst.returns_set or info.returns_set, worst.aggregate or info.aggregate)
        return found, worst

    def volatility(self, name: str, schema: str | None = None) -> str | None:
        """'i', 's' or 'v' (the most volatile overload, in any schema if none is given), or
        None if unknown."""
        by_schema = self.functions.get(name)
        if not by_schema:
            return None
        if schema is not None:
            info = by_schema.get(schema)
            return info.volatility if info else None
        return max((f.volatility for f in by_schema.values()), key=VOLATILITY_ORDER.index)


def _more_volatile(a: Function, b: Function) -> bool:
    return VOLATILITY_ORDER.index(a.volatility) > VOLATILITY_ORDER.index(b.volatility)


# ---- loading ----------------------------------------------------------------------------------------

_FUNCTIONS = """
SELECT n.nspname, p.proname,
       CASE WHEN bool_or(p.provolatile = 'v') THEN 'v' WHEN bool_or(p.provolatile = 's') THEN 's'
            ELSE 'i' END AS vol,
       bool_or(p.proretset) AS retset, bool_or(p.prokind = 'a') AS agg
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
GROUP BY 1, 2
"""
_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind::text, c.relpersistence::text, c.relrowsecurity  -- "char": bytes
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f', 'S') AND n.nspname !~ '^pg_toast'
"""
_SCHEMAS = """
SELECT nspname FROM pg_catalog.pg_namespace WHERE nspname !~ '^pg_(toast|temp_)'
"""
# What each view's rewrite rule depends on: relations (tables, views...) and functions.
# What each user view's (or materialized view's) rule depends on: relations only (built-ins are
# not recorded).
_VIEW_DEPS = """
SELECT DISTINCT vn.nspname, v.relname, v.relkind = 'm' AS materialized, rn.nspname AS rel_schema,
       r.relname AS rel_name
FROM pg_catalog.pg_rewrite w
JOIN pg_catalog.pg_class v ON v.oid = w.ev_class AND v.relkind IN ('v', 'm')
JOIN pg_catalog.pg_namespace vn ON vn.oid = v.relnamespace
JOIN pg_catalog.pg_depend d ON d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND d.objid = w.oid
JOIN pg_catalog.pg_class r
  ON d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND r.oid = d.refobjid AND r.oid <> v.oid
JOIN pg_catalog.pg_namespace rn ON rn.oid = r.relnamespace
WHERE vn.nspname NOT IN ('pg_catalog', 'information_schema')
"""
# With search_path = pg_catalog, pg_get_viewdef qualifies every other name.
_VIEW_DEFS = """
SELECT n.nspname, c.relname, pg_catalog.pg_get_viewdef(c.oid)
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'v' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
"""
_INHERITS = """
SELECT cn.nspname, c.relname, pn.nspname, p.relname
FROM pg_catalog.pg_inherits i
JOIN pg_catalog.pg_class c ON c.oid = i.inhrelid JOIN pg_catalog.pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_catalog.pg_class p ON p.oid = i.inhparent JOIN pg_catalog.pg_namespace pn ON pn.oid = p.relnamespace
WHERE c.relkind IN ('r', 'p', 'f')
"""
# Every foreign key, with its ON DELETE / ON UPDATE actions.
_FOREIGN_KEYS = """
SELECT fn.nspname, f.relname, tn.nspname, t.relname, k.confdeltype::text, k.confupdtype::text
FROM pg_catalog.pg_constraint k
JOIN pg_catalog.pg_class f ON f.oid = k.confrelid JOIN pg_catalog.pg_namespace fn ON fn.oid = f.relnamespace
JOIN pg_catalog.pg_class t ON t.oid = k.conrelid JOIN pg_catalog.pg_namespace tn ON tn.oid = t.relnamespace
WHERE k.contype = 'f'
"""
_TRIGGERS = """
SELECT n.nspname, c.relname
FROM pg_catalog.pg_trigger t JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE NOT t.tgisinternal  -- the change feed's own (cache/feed.py) write nothing
  AND t.tgname NOT IN ('pgsluice_change_feed', 'pgsluice_feed_insert', 'pgsluice_feed_update',
                       'pgsluice_feed_delete', 'pgsluice_feed_truncate')
UNION
SELECT n.nspname, c.relname
FROM pg_catalog.pg_rewrite r JOIN pg_catalog.pg_class c ON c.oid = r.ev_class
JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE r.rulename <> '_RETURN'
"""


def _schema(name: str) -> str:
    return "pg_temp" if name.startswith("pg_temp_") else name


async def load(conn: asyncpg.Connection) -> Catalog:
    """Read the catalog facts over `conn` (one consistent snapshot, read-only)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        fn_rows = await conn.fetch(_FUNCTIONS)
        rel_rows = await conn.fetch(_RELATIONS)
        schema_rows = await conn.fetch(_SCHEMAS)
        view_rows = await conn.fetch(_VIEW_DEPS)
        await conn.execute("SET LOCAL search_path = pg_catalog")
        view_defs = await conn.fetch(_VIEW_DEFS)
        inherit_rows = await conn.fetch(_INHERITS)
        fk_rows = await conn.fetch(_FOREIGN_KEYS)
        trigger_rows = await conn.fetch(_TRIGGERS)
        tables = await load_tables(conn, inherit_rows)
    functions: dict[str, dict[str, Function]] = {}
    for schema, name, vol, retset, agg in fn_rows:
        functions.setdefault(name, {})[_schema(schema)] = Function(vol, bool(retset), bool(agg))
    relations: dict[str, dict[str, Relation]] = {}
    for schema, name, kind, persistence, rls in rel_rows:
        relations.setdefault(name, {})[_schema(schema)] = Relation(kind, persistence, bool(rls))
    return Catalog(
        functions=functions, relations=relations,
        schemas=frozenset(r[0] for r in schema_rows),
        views=_views(view_rows, view_defs),
        write_effects=_write_effects(inherit_rows, fk_rows),
        triggers=frozenset(f"{_schema(s)}.{n}" for s, n in trigger_rows),
        tables=tables, generation=next(_generations),
    )  # fmt: skip


def _views(deps: Iterable[asyncpg.Record], defs: Iterable[asyncpg.Record]) -> dict[str, View]:
    rels: dict[str, set[str]] = {}
    materialized: set[str] = set()
    for v_schema, v_name, is_mat, r_schema, r_name in deps:
        key = f"{_schema(v_schema)}.{v_name}"
        rels.setdefault(key, set()).add(f"{_schema(r_schema)}.{r_name}")
        if is_mat:
            materialized.add(key)
    definitions = {f"{_schema(v_schema)}.{v_name}": definition or "" for v_schema, v_name, definition in defs}
    out: dict[str, View] = {}
    for key in set(rels) | set(definitions):
        seen: set[str] = set()
        stack = list(rels.get(key, ()))
        while stack:  # through plain views below it (not through materialized ones)
            rel = stack.pop()
            if rel not in seen:
                seen.add(rel)
                if rel not in materialized:
                    stack.extend(rels.get(rel, ()))
        out[key] = View(frozenset(seen), definitions.get(key, ""), key in materialized)
    return out


WRITE_OPS = ("insert", "update", "delete", "merge", "truncate", "ddl")
_CHANGES = frozenset({"c", "n", "d"})  # CASCADE, SET NULL, SET DEFAULT


def _write_effects(inherits: Iterable[asyncpg.Record],
                   fks: Iterable[asyncpg.Record]) -> dict[str, dict[str, frozenset[str]]]:
    """op -> relation -> the other relations a write of that kind to it can change.

    A write to a relation is a write of the same kind to its children (partitions, inheriting
    tables). A foreign key's action turns a delete or update of referenced rows into a write
    of the referencing table: ON DELETE CASCADE deletes, ON DELETE SET NULL / SET DEFAULT and
    ON UPDATE CASCADE / SET NULL / SET DEFAULT update; TRUNCATE ... CASCADE truncates every
    referencing table. What a relation holds shows in its parents."""
    parents: dict[str, set[str]] = {}
    children: dict[str, set[str]] = {}
    for c_schema, c_name, p_schema, p_name in inherits:
        child, parent = f"{_schema(c_schema)}.{c_name}", f"{_schema(p_schema)}.{p_name}"
        parents.setdefault(child, set()).add(parent)
        children.setdefault(parent, set()).add(child)
    # (relation, op) -> the (relation, op) writes it causes through foreign keys
    causes: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for f_schema, f_name, t_schema, t_name, on_delete, on_update in fks:
        referenced, referencing = f"{_schema(f_schema)}.{f_name}", f"{_schema(t_schema)}.{t_name}"
        causes.setdefault((referenced, "truncate"), set()).add((referencing, "truncate"))
        if on_delete in _CHANGES:
            causes.setdefault((referenced, "delete"), set()).add(
                (referencing, "delete" if on_delete == "c" else "update"))
        if on_update in _CHANGES:
            causes.setdefault((referenced, "update"), set()).add((referencing, "update"))

    def changed_by(rel: str, ops: tuple[str, ...]) -> set[str]:
        seen: set[tuple[str, str]] = set()
        stack = [(rel, op) for op in ops]
        while stack:
            state = stack.pop()
            if state in seen:
                continue
            seen.add(state)
            name, op = state
            stack.extend((child, op) for child in children.get(name, ()))
            stack.extend(causes.get(state, ()))
        return {name for name, _ in seen}

    def visible(changed: set[str]) -> set[str]:
        out = set(changed)
        stack = list(changed)
        while stack:
            for parent in parents.get(stack.pop(), ()):
                if parent not in out:
                    out.add(parent)
                    stack.append(parent)
        return out

    ops_of = {"insert": ("insert",), "ddl": ("ddl",), "update": ("update",), "delete": ("delete",),
              "merge": ("update", "delete"), "truncate": ("truncate",)}
    relations = set(parents) | set(children) | {rel for rel, _ in causes}
    result: dict[str, dict[str, frozenset[str]]] = {}
    for op in WRITE_OPS:
        by_rel: dict[str, frozenset[str]] = {}
        for rel in relations:
            also = visible(changed_by(rel, ops_of[op])) - {rel}
            if also:
                by_rel[rel] = frozenset(also)
        result[op] = by_rel
    result["any"] = {rel: frozenset().union(*(result[op].get(rel, frozenset()) for op in WRITE_OPS))
                     for rel in relations if any(rel in result[op] for op in WRITE_OPS)}
    return result
