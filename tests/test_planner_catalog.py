"""Catalog facts from a real Postgres, and the cacheability decisions made with them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from planner import Kind, Planner, SessionFacts
from planner.catalog import Catalog, load
from planner.plan import Flag
from proxy.embedded import EmbeddedPostgres

SETUP = """
DROP SCHEMA IF EXISTS cat_app CASCADE; CREATE SCHEMA cat_app;
CREATE TABLE public.cat_items (id int PRIMARY KEY, name text);
CREATE TABLE cat_app.cat_items (id int PRIMARY KEY, name text);
CREATE TABLE cat_app.cat_only (id int);
CREATE FUNCTION cat_app.f_volatile(int) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT $1';
CREATE FUNCTION cat_app.f_immutable(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT $1 + 1';
CREATE FUNCTION public.f_overloaded(int) RETURNS int LANGUAGE sql IMMUTABLE AS 'SELECT 1';
CREATE FUNCTION public.f_overloaded(text) RETURNS int LANGUAGE sql VOLATILE AS 'SELECT 2';
"""
TEARDOWN = """
DROP SCHEMA IF EXISTS cat_app CASCADE; DROP TABLE IF EXISTS public.cat_items;
DROP FUNCTION IF EXISTS public.f_overloaded(int); DROP FUNCTION IF EXISTS public.f_overloaded(text);
DROP FUNCTION IF EXISTS public.f_new();
"""


@pytest.fixture
async def conn(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    c = await asyncpg.connect(pg.dsn(), timeout=10)
    await c.execute(TEARDOWN + SETUP)
    yield c
    await c.execute(TEARDOWN)
    await c.close()


async def test_volatility_and_resolution(conn: asyncpg.Connection) -> None:
    cat = await load(conn)
    assert cat.loaded and cat.generation > 0
    assert cat.volatility("now") == "s" and cat.volatility("random") == "v" and cat.volatility("lower") == "i"
    assert cat.volatility("f_volatile", "cat_app") == "v" and cat.volatility("f_immutable") == "i"
    assert cat.volatility("f_overloaded") == "v"  # the most volatile overload
    assert cat.volatility("no_such_function") is None
    assert cat.resolve("cat_items", ["$user", "public"], "postgres") == "public"
    assert cat.resolve("cat_items", ["cat_app", "public"], "postgres") == "cat_app"
    assert cat.resolve("cat_only", ["public"], "postgres") is None
    assert cat.resolve("pg_class", ["public"], "postgres") == "pg_catalog"
    assert cat.resolve("cat_app", ["$user"], "cat_app") is None  # a schema is not a relation
    await conn.execute("CREATE FUNCTION public.f_new() RETURNS int LANGUAGE sql STABLE AS 'SELECT 1'")
    again = await load(conn)
    assert again.generation > cat.generation and again.volatility("f_new") == "s"


CASES = [
    ("SELECT name FROM cat_items WHERE id = 1", True, {"public.cat_items"}, ""),
    ("SELECT * FROM cat_only", False, {"cat_only"}, "unknown relation"),
    ("SELECT lower(name) FROM cat_items", True, {"public.cat_items"}, ""),
    ("SELECT cat_app.f_immutable(id) FROM cat_items", True, {"public.cat_items"}, ""),
    ("SELECT cat_app.f_volatile(id) FROM cat_items", False, {"public.cat_items"}, "volatile"),
    ("SELECT f_overloaded(1)", False, set(), "volatile"),
    ("SELECT no_such_fn(1)", False, set(), "unknown function"),
    ("SELECT now()", False, set(), "time"),
    ("SELECT random()", False, set(), "chance"),
    ("SELECT * FROM cat_items WHERE name = 'today'", False, {"public.cat_items"}, "time-dependent"),
    ("SELECT relname FROM pg_class WHERE relname = 'cat_items'", True, {"pg_catalog.pg_class"}, ""),
    ("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'", True,
     {"information_schema.tables"}, ""),
    ("SELECT * FROM pg_stat_activity", False, {"pg_catalog.pg_stat_activity"}, "changes without DDL"),
    ("SELECT * FROM cat_items FOR UPDATE", False, {"public.cat_items"}, "FOR UPDATE"),
    ("SELECT 1; SELECT 2", False, set(), "several statements"),
    ("SHOW search_path", False, set(), ""),
]


@pytest.mark.parametrize(("sql", "cacheable", "reads", "why"), CASES, ids=[c[0] for c in CASES])
async def test_cacheability(conn: asyncpg.Connection, sql: str, cacheable: bool, reads: set[str],
                            why: str) -> None:
    plan = Planner(await load(conn)).analyze(sql, SessionFacts())
    assert plan.cacheable is cacheable, plan.why_not
    assert set(plan.tables_read) == reads
    assert why in plan.why_not


async def test_search_path_decides_the_table(conn: asyncpg.Connection) -> None:
    planner = Planner(await load(conn))
    a = planner.analyze("SELECT * FROM cat_items", SessionFacts())
    b = planner.analyze("SELECT * FROM cat_items", SessionFacts(search_path=("cat_app", "public")))
    assert a.tables_read == {"public.cat_items"} and b.tables_read == {"cat_app.cat_items"}


async def test_writes_and_flags(conn: asyncpg.Connection) -> None:
    planner = Planner(await load(conn))
    plan = planner.analyze("WITH d AS (DELETE FROM cat_items WHERE id = 1 RETURNING *) "
                           "INSERT INTO cat_app.cat_only SELECT id FROM d", SessionFacts())
    assert plan.kind is Kind.WRITE and not plan.cacheable
    assert plan.tables_written == {"public.cat_items", "cat_app.cat_only"}
    assert Flag.WRITABLE_CTE in plan.flags
    ddl = planner.analyze("ALTER TABLE cat_items ADD COLUMN x int", SessionFacts())
    assert ddl.kind is Kind.DDL and ddl.tables_written == {"public.cat_items"}
    temp = planner.analyze("CREATE TEMP TABLE t_tmp (x int)", SessionFacts())
    assert Flag.TEMP_TABLE in temp.flags


def test_empty_catalog_is_safe() -> None:
    plan = Planner(Catalog()).analyze("SELECT lower('X')", SessionFacts())
    assert plan.kind is Kind.READ and plan.parsed
