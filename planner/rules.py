"""The cacheability rules: what about a relation, a function call or a column stands against
caching a query's result, and the statement-level reasons that come first (see planner.analyze
for the whole list). `Rules` also resolves names (through the catalog, the search_path and the
relations an earlier statement of the text created), since the verdict depends on what a name
resolves to. The readers (walk.Walker for sqlglot trees, reader.StatementReader for tokens)
find the names and calls and ask here; what they judge on the spot, they judge in one line
(FOR UPDATE, TABLESAMPLE, time literals, SELECT INTO, EXPLAIN, COPY, SHOW ...).
"""

from __future__ import annotations

import re

from sqlglot import exp

from .catalog import Catalog, Function, Relation
from .hazards import SYSTEM_SCHEMAS, TIME_DEPENDENT, builtin_hazard, live_catalog
from .plan import Flag, Kind, SessionFacts
from .result import Analysis, Stmt

SYSTEM_COLUMNS = frozenset({"xmin", "xmax", "cmin", "cmax", "ctid"})
# pg_class / pg_database columns that VACUUM, ANALYZE and autovacuum change without DDL.
LIVE_CATALOG_COLUMNS = frozenset({"reltuples", "relpages", "relallvisible", "relallfrozen", "relfrozenxid",
                                   "relminmxid", "datfrozenxid", "datminmxid"})
LIVE_STAR_TABLES = frozenset({"pg_catalog.pg_class", "pg_catalog.pg_database"})
TIME_CLASS = re.compile(r"^(Current|Local|Sys)\w*(Timestamp|Date|Time|Datetime)\w*$")
VOLATILE_CLASSES = frozenset({"Rand", "Random", "Uuid", "RandomUuid", "Randn"})
SRF_CLASSES = frozenset({"Explode", "ExplodingGenerateSeries", "GenerateSeries", "Unnest", "Posexplode"})


def column_reason(name: str) -> str:
    """Why reading a column of this name stands against caching ("" if it does not)."""
    if name in SYSTEM_COLUMNS:
        return f"system column {name} changes without a write"
    if name in LIVE_CATALOG_COLUMNS:
        return f"{name} changes without DDL"
    return ""


class Rules:
    """Name resolution and the rules, for one text analysed in one session."""

    def __init__(self, facts: SessionFacts, catalog: Catalog) -> None:
        self.facts = facts
        self.catalog = catalog
        self.path = facts.search_path
        self.user = facts.user
        self.created: dict[str, str] = {}  # relations created by earlier statements of the text

    def view_body(self, definition: str, facts: SessionFacts) -> Analysis:
        """The analysis of a view's definition (the analyzer, which reads statements, supplies it)."""
        raise NotImplementedError

    @staticmethod
    def finish(out: Analysis, results: list[Stmt]) -> None:
        """Cacheability: the statement-level reasons first, then the details."""
        if not results:
            out.no_cache("empty query")
            return
        if len(results) > 1:
            out.no_cache("several statements")
        st = results[0]
        if not out.parsed:
            out.no_cache("not understood by the parser")
        if out.kind is not Kind.READ:
            out.no_cache(f"{out.kind.value} statement")
        if st.note:
            out.no_cache(st.note)
        if not st.plain_query:
            out.no_cache("not a plain query")
        for r in results:
            if r.why:
                out.no_cache(r.why)

    # ---- names ----

    def rels(self, names: list[list[str]], into: set[str], st: Stmt, *, create: bool = False,
             temp: bool = False, op: str = "ddl") -> None:
        """Resolve each name into `into` (st.reads or st.writes); a write also lists what it
        changes through partitions, inheritance and foreign keys (catalog.also_written)."""
        for parts in names:
            if parts:
                schema = parts[-2] if len(parts) > 1 else None
                qualified = self.relation(schema, parts[-1], st, create=create, temp=temp)
                into.add(qualified)
                if into is st.writes:
                    into |= self.catalog.also_written(qualified, op)

    def drop_schema(self, schema: str, st: Stmt) -> None:
        """DROP SCHEMA ... CASCADE: every relation in it, and the views elsewhere built on them."""
        dropped = self.catalog.relations_in(schema)
        st.writes |= dropped
        for qualified in dropped:
            st.writes |= self.catalog.dependent_views(qualified)

    def relation(self, schema: str | None, name: str, st: Stmt, *, create: bool = False,
                 temp: bool = False) -> str:
        """'schema.name' for a relation (bare name if it cannot be resolved), noting what
        about it stands against caching: unknown, temporary, sequence, foreign, live catalog,
        a view over volatile functions."""
        catalog = self.catalog
        if temp:
            schema = "pg_temp"
        rel: Relation | None = None
        if schema is None:
            schema = catalog.creation_schema(self.path, self.user) if create else \
                catalog.resolve(name, self.path, self.user)
            if schema is None and not create:
                schema = self.created.get(name)  # created by an earlier statement of the text
            if schema is None:
                st.no_cache(f"unknown relation {name}")
                return name
            if create:
                self.created[name] = schema
        elif schema.startswith("pg_temp"):
            schema = "pg_temp"
        qualified = f"{schema}.{name}"
        rel = catalog.relation(schema, name)
        if rel is None and not create:
            st.no_cache(f"unknown relation {qualified}")
        if schema == "pg_temp" or (rel is not None and rel.persistence == "t"):
            st.flags.add(Flag.TEMP_TABLE)
            st.no_cache("temporary table")
        if schema in SYSTEM_SCHEMAS:
            st.flags.add(Flag.CATALOG)
            if schema == "pg_catalog" and live_catalog(name):
                st.no_cache(f"{name} changes without DDL")
        if rel is not None:
            if rel.row_security:
                st.no_cache(f"row-level security on {qualified} (policies may depend on the session)")
            if rel.kind == "S":
                st.no_cache(f"reads sequence {qualified}")
            elif rel.kind == "f":
                st.no_cache(f"foreign table {qualified} changes outside Postgres")
        return qualified

    def read_view(self, qualified: str, st: Stmt) -> None:
        """A user view is read through: its relations count as read; its definition is
        analysed like a query (once per catalog) and what stands against caching it, its
        flags and its functions become the reader's."""
        catalog = self.catalog
        view = catalog.view(qualified)
        if view is None or view.materialized:
            return
        st.reads |= view.relations
        verdict = catalog.view_verdicts.get(qualified)
        if verdict is None:
            catalog.view_verdicts[qualified] = (f"view {qualified} is defined in terms of itself",
                                                frozenset(), frozenset())  # guards recursion
            facts = SessionFacts(self.facts.database, self.facts.user, ("pg_catalog",))
            body = self.view_body(view.definition, facts)
            why = f"view {qualified}: {body.why_not}" if body.why_not else ""
            if body.kind is not Kind.READ or body.statements != 1:
                why = f"view {qualified}: definition not understood"
            verdict = (why, frozenset(body.flags - {Flag.UNBOUNDED_SELECT}), frozenset(body.functions))
            catalog.view_verdicts[qualified] = verdict
        why, flags, functions = verdict
        if why:
            st.no_cache(why)
        st.flags |= flags
        st.functions |= functions

    def function(self, name: str, schema: str | None, st: Stmt, nargs: int,
                 first_arg: exp.Expression | None) -> Function | None:
        """An (Anonymous, i.e. not sqlglot-typed) function call; its catalog facts."""
        catalog = self.catalog
        resolved, info = catalog.function(name, schema, self.path, self.user)
        qualified = f"{resolved}.{name}" if resolved else name
        st.functions.add(qualified)
        builtin = resolved in (None, "pg_catalog") and schema in (None, "pg_catalog")
        if builtin:
            self.hazards(name, schema, st)
            if name == "age" and nargs == 1:
                st.no_cache("age() with one argument depends on the current date")
            if name == "set_config" and isinstance(first_arg, exp.Literal) and \
                    str(first_arg.this).lower() in ("role", "session_authorization"):
                st.flags.add(Flag.SET_ROLE)
        if info is None:
            st.no_cache(f"unknown function {qualified}()" if catalog.loaded
                        else "function volatility unknown (catalog not loaded)")
        elif info.volatility == "v":
            st.flags.add(Flag.VOLATILE_FUNCTION)
            st.no_cache(f"{qualified}() is volatile")
        elif info.volatility == "s" and resolved not in SYSTEM_SCHEMAS:
            st.no_cache(f"{qualified}() is a stable user-defined function (may read other tables)")
        return info

    def builtin(self, fn: exp.Func, name: str, st: Stmt) -> bool:
        """A call sqlglot typed (a built-in as far as it knows; the catalog decides which schema
        on the path has it). True if it returns a set."""
        cls = type(fn).__name__
        resolved, info = self.catalog.function(name, None, self.path, self.user)
        if info is not None and resolved not in SYSTEM_SCHEMAS:
            args = fn.expressions or [v for k, v in fn.args.items() if isinstance(v, exp.Expression)]
            self.function(name, None, st, len(args), None)  # e.g. public.lower before pg_catalog
            return info.returns_set
        st.functions.add(f"{resolved}.{name}" if resolved else name)
        self.hazards(name, None, st)
        if TIME_CLASS.match(cls) and name not in TIME_DEPENDENT:
            st.no_cache(f"{name} depends on the time")
        if cls in VOLATILE_CLASSES or (info is not None and info.volatility == "v"):
            st.flags.add(Flag.VOLATILE_FUNCTION)
            st.no_cache(f"{name}() is volatile")
        return cls in SRF_CLASSES or bool(info and info.returns_set)

    def call(self, parts: list[str], st: Stmt) -> None:
        """CALL proc(...) read from tokens: the procedure, and its hazards if it is a built-in."""
        schema = parts[-2] if len(parts) > 1 else None
        resolved, _info = self.catalog.function(parts[-1], schema, self.path, self.user)
        st.functions.add(f"{resolved}.{parts[-1]}" if resolved else parts[-1])
        self.hazards(parts[-1], schema, st)

    def hazards(self, name: str, schema: str | None, st: Stmt) -> None:
        """What a built-in's name alone says against caching (catalog.builtin_hazard), whatever
        pg_proc says about its volatility."""
        if schema not in (None, "pg_catalog"):
            return
        time_dep, session_dep, side, danger = builtin_hazard(name)
        if side:
            st.flags.add(Flag.SIDE_EFFECT_FUNCTION)
            st.no_cache(f"{name}() has side effects")
        if danger:
            st.flags.add(Flag.DANGEROUS_FUNCTION)
        if time_dep:
            st.no_cache(f"{name}() depends on the time")
        if session_dep:
            st.no_cache(f"{name}() depends on the session or the server's state")
