"""Catalog facts loaded from a real Postgres: relation resolution through search_path ($user,
pg_temp, explicit schemas, pg_catalog first), function volatility (overloads, user-defined,
same name in several schemas), views, write effects (partitions, inheritance, cascading
foreign keys), and refresh after DDL (a new generation that knows the new objects)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import asyncpg
import pytest

from planner.analyze import analyze_statements
from planner.catalog import Catalog, Function, load
from planner.hazards import builtin_hazard, live_catalog
from planner.plan import Flag, SessionFacts
from proxy.ops.embedded import EmbeddedPostgres

SCHEMA = """
CREATE SCHEMA app;
CREATE SCHEMA alice;
CREATE TABLE public.items (id int PRIMARY KEY, name text);
CREATE TABLE app.items (id int);
CREATE TABLE alice.items (id int);
CREATE TABLE public.pg_class (id int);  -- shadowed by pg_catalog.pg_class unless the path says otherwise
CREATE UNLOGGED TABLE public.scratch (id int);
CREATE SEQUENCE public.ids;
CREATE VIEW public.v1 AS SELECT id, name FROM public.items;
CREATE VIEW public.v2 AS SELECT v1.id, a.id AS app_id FROM public.v1 JOIN app.items a USING (id);
CREATE MATERIALIZED VIEW public.mv AS SELECT count(*) AS n FROM public.items;
CREATE FUNCTION public.f_imm(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE FUNCTION public.f_stable(int) RETURNS int LANGUAGE sql STABLE AS 'SELECT $1';
CREATE FUNCTION public.f_vol(int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1';
CREATE FUNCTION public.over(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1';
CREATE FUNCTION public.over(text) RETURNS text LANGUAGE sql VOLATILE AS 'SELECT $1';
CREATE FUNCTION app.dup() RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
CREATE FUNCTION public.dup() RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 1';
CREATE FUNCTION public.srf() RETURNS SETOF int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
CREATE AGGREGATE public.my_sum(int) (sfunc = int4pl, stype = int);
CREATE TABLE public.parent (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE public.part_a PARTITION OF public.parent FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE public.part_b PARTITION OF public.parent FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE public.base (id int);
CREATE TABLE public.derived (extra int) INHERITS (public.base);
CREATE TABLE public.authors (id int PRIMARY KEY);
CREATE TABLE public.books (id int PRIMARY KEY,
                           author_id int REFERENCES public.authors ON DELETE CASCADE ON UPDATE NO ACTION);
CREATE TABLE public.reviews (book_id int REFERENCES public.books ON UPDATE CASCADE);
CREATE TABLE public.tags (author_id int REFERENCES public.authors);  -- NO ACTION: nothing cascades
CREATE FUNCTION public.trg() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
CREATE TRIGGER items_trg BEFORE INSERT ON public.items FOR EACH ROW EXECUTE FUNCTION public.trg();
CREATE TABLE public.secured (id int);
ALTER TABLE public.secured ENABLE ROW LEVEL SECURITY;
"""


@pytest.fixture(scope="module")
def catalog_dsn(pg: EmbeddedPostgres) -> Iterator[str]:
    """A database of its own with SCHEMA; dropped afterwards."""
    name = f"pgsluice_catalog_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        admin = await asyncpg.connect(pg.dsn())
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(pg.dsn(database=name))
        try:
            await conn.execute(SCHEMA)
        finally:
            await conn.close()

    async def drop() -> None:
        admin = await asyncpg.connect(pg.dsn())
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()

    asyncio.run(create())
    try:
        yield pg.dsn(database=name)
    finally:
        asyncio.run(drop())


async def _load(dsn: str) -> Catalog:
    conn = await asyncpg.connect(dsn)
    try:
        return await load(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def catalog(catalog_dsn: str) -> Catalog:
    return asyncio.run(_load(catalog_dsn))


def test_empty_catalog_knows_nothing() -> None:
    empty = Catalog()
    assert not empty.loaded and empty.generation == 0
    assert empty.resolve("items", ("$user", "public"), "postgres") is None
    assert empty.creation_schema(("$user", "public"), "postgres") is None
    assert empty.relation("public", "items") is None
    assert empty.function("now", None, ("public",), "postgres") == (None, None)
    assert empty.volatility("now") is None
    assert empty.view("public.v1") is None
    assert empty.also_written("public.items") == frozenset()


def test_load_reads_relations_and_functions(catalog: Catalog) -> None:
    assert catalog.loaded and catalog.generation > 0
    assert {"public", "app", "alice", "pg_catalog", "information_schema"} <= catalog.schemas
    assert catalog.relation("public", "items") is not None and catalog.relation("public", "items").kind == "r"
    assert catalog.relation("public", "ids").kind == "S"  # type: ignore[union-attr]
    assert catalog.relation("public", "v1").kind == "v"  # type: ignore[union-attr]
    assert catalog.relation("public", "mv").kind == "m"  # type: ignore[union-attr]
    assert catalog.relation("public", "parent").kind == "p"  # type: ignore[union-attr]
    assert catalog.relation("public", "scratch").persistence == "u"  # type: ignore[union-attr]
    assert catalog.relation("public", "secured").row_security  # type: ignore[union-attr]
    assert not catalog.relation("public", "items").row_security  # type: ignore[union-attr]
    assert catalog.relation("pg_catalog", "pg_class") is not None
    assert catalog.relation("information_schema", "columns") is not None
    assert "public.items" in catalog.triggers
    assert "public.books" not in catalog.triggers  # FK triggers are internal


def test_search_path_user_schema(catalog: Catalog) -> None:
    path = ("$user", "public")
    assert catalog.resolve("items", path, "alice") == "alice"
    assert catalog.resolve("items", path, "bob") == "public"  # no schema bob: skipped
    assert catalog.resolve("items", path, "postgres") == "public"


def test_search_path_explicit_schemas(catalog: Catalog) -> None:
    assert catalog.resolve("items", ("app", "public"), "postgres") == "app"
    assert catalog.resolve("items", ("nosuch", "public", "app"), "postgres") == "public"
    assert catalog.resolve("items", ("nosuch",), "postgres") is None
    assert catalog.resolve("no_such_table", ("public",), "postgres") is None


def test_pg_catalog_is_searched_first_unless_listed(catalog: Catalog) -> None:
    assert catalog.resolve("pg_class", ("$user", "public"), "postgres") == "pg_catalog"
    assert catalog.resolve("pg_class", ("public", "pg_catalog"), "postgres") == "public"
    assert catalog.relation_path(("public",), "x") == ("pg_temp", "pg_catalog", "public")
    assert catalog.relation_path(("public", "pg_temp"), "x") == ("pg_catalog", "public", "pg_temp")


def test_other_sessions_temp_tables_count_as_temporary(catalog_dsn: str) -> None:
    """The catalog is read over its own connection: it sees every session's temporary
    tables, and a name that is one shadows the permanent table for any session (pg_temp is
    searched first) - so such names are treated as temporary: never cacheable."""

    async def run() -> tuple[Catalog, Catalog]:
        holder = await asyncpg.connect(catalog_dsn)
        try:
            await holder.execute("CREATE TEMP TABLE items (id int); CREATE TEMP TABLE only_temp (x int)")
            with_temp = await _load(catalog_dsn)
        finally:
            await holder.close()
        return with_temp, await _load(catalog_dsn)

    with_temp, after = asyncio.run(run())
    assert with_temp.resolve("items", ("$user", "public"), "postgres") == "pg_temp"
    assert with_temp.resolve("only_temp", ("public",), "postgres") == "pg_temp"
    assert with_temp.resolve("items", ("public", "pg_temp"), "postgres") == "public"  # pg_temp listed later
    a = analyze_statements("SELECT * FROM items", SessionFacts(), with_temp)
    assert a.tables_read == {"pg_temp.items"} and Flag.TEMP_TABLE in a.flags and not a.cacheable
    assert after.resolve("items", ("$user", "public"), "postgres") == "public"  # the session ended


def test_creation_schema(catalog: Catalog) -> None:
    assert catalog.creation_schema(("$user", "public"), "postgres") == "public"
    assert catalog.creation_schema(("$user", "public"), "alice") == "alice"
    assert catalog.creation_schema(("nosuch", "app"), "postgres") == "app"
    assert catalog.creation_schema(("pg_temp", "public"), "postgres") == "pg_temp"
    assert catalog.creation_schema(("nosuch",), "postgres") is None


def test_function_volatility(catalog: Catalog) -> None:
    path = ("$user", "public")
    assert catalog.function("f_imm", None, path, "postgres") == ("public", Function("i"))
    assert catalog.function("f_stable", None, path, "postgres") == ("public", Function("s"))
    assert catalog.function("f_vol", None, path, "postgres") == ("public", Function("v"))
    assert catalog.function("over", None, path, "postgres")[1] == Function("v")  # most volatile overload
    assert catalog.volatility("over") == "v"
    assert catalog.function("srf", None, path, "postgres")[1] == Function("i", returns_set=True)
    assert catalog.function("my_sum", None, path, "postgres")[1] == Function("i", aggregate=True)
    assert catalog.function("no_such_fn", None, path, "postgres") == (None, None)
    assert catalog.function("f_imm", "app", path, "postgres") == ("app", None)  # explicit, missing


def test_same_function_name_in_several_schemas(catalog: Catalog) -> None:
    schema, info = catalog.function("dup", None, ("app", "public"), "postgres")
    assert schema == "app" and info is not None and info.volatility == "v"  # the worst on the path
    assert catalog.function("dup", None, ("app",), "postgres") == ("app", Function("i"))
    assert catalog.function("dup", "app", ("public",), "postgres") == ("app", Function("i"))
    assert catalog.volatility("dup", "public") == "v"


def test_builtin_volatility_and_hazards(catalog: Catalog) -> None:
    path = ("$user", "public")
    assert catalog.function("now", None, path, "postgres") == ("pg_catalog", Function("s"))
    assert catalog.function("random", None, path, "postgres")[1] == Function("v")
    assert catalog.function("lower", None, path, "postgres") == ("pg_catalog", Function("i"))
    assert catalog.function("generate_series", None, path, "postgres")[1].returns_set  # type: ignore[union-attr]
    assert catalog.function("count", None, path, "postgres")[1].aggregate  # type: ignore[union-attr]
    assert builtin_hazard("now") == (True, False, False, False)
    assert builtin_hazard("current_setting") == (False, True, False, False)
    assert builtin_hazard("pg_stat_get_live_tuples")[1]
    assert builtin_hazard("nextval") == (False, False, True, False)
    assert builtin_hazard("pg_advisory_xact_lock")[2]
    assert builtin_hazard("pg_read_file") == (False, False, True, True)
    assert builtin_hazard("dblink_exec")[3]
    assert builtin_hazard("lower") == (False, False, False, False)
    assert live_catalog("pg_stat_activity") and live_catalog("pg_locks") and live_catalog("pg_statistic")
    assert not live_catalog("pg_class") and not live_catalog("pg_statistic_ext")


def test_views_close_over_views(catalog: Catalog) -> None:
    v1, v2 = catalog.view("public.v1"), catalog.view("public.v2")
    assert v1 is not None and v1.relations == {"public.items"}
    assert v2 is not None and v2.relations == {"public.v1", "public.items", "app.items"}
    assert "public.items" in v1.definition  # qualified: read with search_path = pg_catalog
    mv = catalog.view("public.mv")  # a materialized view's rows do not follow its tables ...
    assert mv is not None and mv.materialized and mv.relations == {"public.items"}
    assert analyze_statements("SELECT * FROM mv", SessionFacts(), catalog).tables_read == {"public.mv"}
    # ... until REFRESH, which reads them; DROP ... CASCADE takes the views built on a table
    refresh = analyze_statements("REFRESH MATERIALIZED VIEW mv", SessionFacts(), catalog)
    assert refresh.tables_read == {"public.items"} and refresh.tables_written == {"public.mv"}
    assert catalog.dependent_views("public.items") == {"public.v1", "public.v2", "public.mv"}
    drop = analyze_statements("DROP TABLE items CASCADE", SessionFacts(), catalog)
    assert drop.tables_written == {"public.items", "public.v1", "public.v2", "public.mv"}
    assert catalog.relations_in("app") == {"app.items"}
    a = analyze_statements("SELECT * FROM v2", SessionFacts(), catalog)
    assert a.tables_read == {"public.v2", "public.v1", "public.items", "app.items"} and a.cacheable


def test_write_effects(catalog: Catalog) -> None:
    # partitions: a write through the parent lands in any partition; a partition's rows show in the parent
    assert catalog.also_written("public.parent", "insert") == {"public.part_a", "public.part_b"}
    assert catalog.also_written("public.part_a", "update") == {"public.parent"}  # not part_b
    # plain inheritance works the same way
    assert catalog.also_written("public.base", "delete") == {"public.derived"}
    assert catalog.also_written("public.derived", "insert") == {"public.base"}
    # foreign keys: only what their actions change
    assert catalog.also_written("public.authors", "insert") == frozenset()
    assert catalog.also_written("public.authors", "delete") == {"public.books"}  # ON DELETE CASCADE
    assert catalog.also_written("public.authors", "update") == frozenset()  # ON UPDATE NO ACTION
    assert catalog.also_written("public.books", "update") == {"public.reviews"}
    assert catalog.also_written("public.books", "delete") == frozenset()
    assert catalog.also_written("public.authors", "merge") == {"public.books"}
    assert catalog.also_written("public.authors", "truncate") == {"public.books", "public.reviews",
                                                                  "public.tags"}
    assert catalog.also_written("public.authors") >= {"public.books", "public.tags"}  # "any"
    assert catalog.also_written("public.items", "delete") == frozenset()


def test_refresh_after_ddl(catalog_dsn: str) -> None:
    async def run() -> tuple[Catalog, Catalog, Catalog]:
        conn = await asyncpg.connect(catalog_dsn)
        try:
            before = await Catalog.load(conn)
            await conn.execute("CREATE FUNCTION public.brand_new(int) RETURNS int LANGUAGE sql STABLE "
                               "AS 'SELECT $1'; CREATE TABLE app.fresh (id int)")
            try:
                after = await before.refresh(conn)
                await conn.execute("ALTER FUNCTION public.brand_new(int) VOLATILE")
                again = await after.refresh(conn)
            finally:
                await conn.execute("DROP FUNCTION public.brand_new(int); DROP TABLE app.fresh")
        finally:
            await conn.close()
        return before, after, again

    before, after, again = asyncio.run(run())
    assert before.generation < after.generation < again.generation
    assert before.function("brand_new", None, ("public",), "x") == (None, None)  # frozen: unchanged
    assert after.function("brand_new", None, ("public",), "x") == ("public", Function("s"))
    assert again.function("brand_new", None, ("public",), "x") == ("public", Function("v"))
    assert before.resolve("fresh", ("app",), "x") is None and after.resolve("fresh", ("app",), "x") == "app"
    facts = SessionFacts()
    assert analyze_statements("SELECT brand_new(1)", facts, before).why_not == "unknown function brand_new()"
    assert "stable user-defined" in analyze_statements("SELECT brand_new(1)", facts, after).why_not
    assert "volatile" in analyze_statements("SELECT brand_new(1)", facts, again).why_not


def test_load_is_quick(catalog_dsn: str) -> None:
    start = time.perf_counter()
    catalog = asyncio.run(_load(catalog_dsn))
    elapsed = time.perf_counter() - start
    assert catalog.loaded
    assert elapsed < 2.0, elapsed  # one connection, seven catalog queries (~30 ms on a laptop)
