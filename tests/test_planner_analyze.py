"""Statement analysis against a corpus of real-world Postgres statements, with catalog facts
loaded from a real database, plus fuzzing: `analyze_statements` must never raise.

The corpus (tests/planner_corpus/*.toml) holds TPC-H, pgbench (scripts and -i), the queries
psql 18 sends for \\d and friends, SQLAlchemy 2's PostgreSQL reflection queries, typical AI
agent look-ups, DDL, DML, CTEs, COPY, transaction and session statements. Each case names the
kind, the tables read and written (exact sets), the flags (exact set), whether the result is
cacheable (and optionally a substring of `why_not`), and optionally the functions. The schema
they run against is tests/planner_corpus/schema.sql, loaded into a database of its own.
"""

from __future__ import annotations

import asyncio
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import Planner
from planner.analyze import Analysis, analyze_statements, first_words, statement_kind, tokens
from planner.canonical import parse
from planner.catalog import Catalog, load
from planner.plan import Flag, Kind, SessionFacts
from proxy.ops.embedded import EmbeddedPostgres

CORPUS_DIR = Path(__file__).parent / "planner_corpus"
KEYS = {"id", "sql", "kind", "reads", "writes", "flags", "cacheable", "why", "functions", "parsed",
        "search_path", "user", "prepare", "note"}


def load_corpus() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = []
    for path in sorted(CORPUS_DIR.glob("*.toml")):
        for case in tomllib.loads(path.read_text())["case"]:
            unknown = set(case) - KEYS
            assert not unknown, f"{path.name}: {case.get('id')}: unknown keys {unknown}"
            case["file"] = path.stem
            cases.append(case)
    ids = [c["id"] for c in cases]
    assert len(ids) == len(set(ids)), "duplicate corpus ids"
    return cases


CASES = load_corpus()


def facts_for(case: dict[str, Any], database: str = "corpus") -> SessionFacts:
    return SessionFacts(database=database, user=case.get("user", "postgres"),
                        search_path=tuple(case.get("search_path", ("$user", "public"))))


async def _create(dsn: str, name: str) -> Catalog:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(dsn.rsplit("/", 1)[0] + "/" + name)
    try:
        await conn.execute((CORPUS_DIR / "schema.sql").read_text())
        return await load(conn)
    finally:
        await conn.close()


async def _drop(dsn: str, name: str) -> None:
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def corpus_db(pg: EmbeddedPostgres) -> Iterator[tuple[str, Catalog]]:
    """A database with the corpus schema, and its catalog facts."""
    name = f"pgsluice_corpus_{uuid.uuid4().hex[:8]}"
    catalog = asyncio.run(_create(pg.dsn(), name))
    try:
        yield name, catalog
    finally:
        asyncio.run(_drop(pg.dsn(), name))


def describe(a: Analysis) -> str:
    return (f"kind={a.kind.value} reads={sorted(a.tables_read)} writes={sorted(a.tables_written)} "
            f"flags={sorted(f.value for f in a.flags)} functions={sorted(a.functions)} parsed={a.parsed} "
            f"why_not={a.why_not!r}")


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_corpus(case: dict[str, Any], corpus_db: tuple[str, Catalog]) -> None:
    name, catalog = corpus_db
    facts = facts_for(case, name)
    a = analyze_statements(case["sql"], facts, catalog)
    got = describe(a)
    assert a.kind is Kind(case["kind"]), got
    assert a.tables_read == set(case.get("reads", [])), got
    assert a.tables_written == set(case.get("writes", [])), got
    assert {f.value for f in a.flags} == set(case.get("flags", [])), got
    assert a.cacheable is case["cacheable"], got
    assert a.parsed is case.get("parsed", True), got
    if "why" in case:
        assert case["why"] in a.why_not, got
    if "functions" in case:
        assert a.functions == set(case["functions"]), got
    # the same answer from a parse of the whole text (what the planner hands in) ...
    again = analyze_statements(case["sql"], facts, catalog, parse(case["sql"]))
    assert describe(again) == got
    # ... and through the Planner, into a Plan
    plan = Planner(catalog).analyze(case["sql"], facts)
    assert (plan.kind, plan.tables_read, plan.tables_written, plan.flags) == (
        a.kind, frozenset(a.tables_read), frozenset(a.tables_written), frozenset(a.flags))
    assert plan.cacheable <= a.cacheable


def test_corpus_size_and_coverage() -> None:
    assert len(CASES) >= 300
    kinds = {c["kind"] for c in CASES}
    assert kinds == {k.value for k in Kind}
    flags = {f for c in CASES for f in c.get("flags", [])}
    assert flags == {f.value for f in Flag}, {f.value for f in Flag} - flags
    by_file = {c["file"] for c in CASES}
    assert {"tpch", "pgbench", "psql", "sqlalchemy", "agent"} <= by_file
    assert sum(c["file"] == "tpch" and c["id"].startswith("tpch-q") for c in CASES) >= 22


async def _prepare_all(dsn: str) -> list[str]:
    """Every single-statement corpus text must be valid Postgres: Parse (with parse analysis
    for queries and DML) must accept it. Nothing is executed."""
    failures = []
    conn = await asyncpg.connect(dsn)
    try:
        for case in CASES:
            if not case.get("prepare", True) or len(first_words(case["sql"], 1)) == 0:
                continue
            if analyze_statements(case["sql"], SessionFacts(), Catalog()).statements != 1:
                continue
            path = ", ".join(f'"{s}"' for s in case.get("search_path", ("$user", "public")))
            await conn.execute(f"SET search_path = {path}")
            try:
                await conn.prepare(case["sql"])
            except asyncpg.PostgresError as err:
                failures.append(f"{case['id']}: {type(err).__name__}: {err}")
    finally:
        await conn.close()
    return failures


def test_corpus_is_valid_postgres(pg: EmbeddedPostgres, corpus_db: tuple[str, Catalog]) -> None:
    name, _ = corpus_db
    failures = asyncio.run(_prepare_all(pg.dsn(database=name)))
    assert not failures, "\n".join(failures)


# ---- without a catalog ----------------------------------------------------------------------------


def test_empty_catalog_nothing_with_tables_is_cacheable() -> None:
    empty = Catalog()
    facts = SessionFacts()
    for case in CASES:
        a = analyze_statements(case["sql"], facts, empty)
        assert a.kind is Kind(case["kind"]), case["id"]
        if a.tables_read or a.tables_written:
            assert not a.cacheable, (case["id"], describe(a))
        if a.cacheable:  # only built-ins sqlglot knows by name (count, lower, version, ...)
            assert case["cacheable"] and all("." not in f for f in a.functions), case["id"]
    a = analyze_statements("SELECT 1", facts, empty)
    assert a.cacheable and a.kind is Kind.READ
    a = analyze_statements("SELECT * FROM users", facts, empty)
    assert not a.cacheable and a.why_not == "unknown relation users" and a.tables_read == {"users"}
    a = analyze_statements("SELECT my_func(1)", facts, empty)
    assert a.why_not == "function volatility unknown (catalog not loaded)"
    a = analyze_statements("SELECT pg_sleep(1)", facts, empty)
    assert Flag.SIDE_EFFECT_FUNCTION in a.flags



# ---- decisions, one by one -------------------------------------------------------------------------


@pytest.mark.parametrize(("sql", "why"), [
    ("SELECT 1; SELECT 2", "several statements"),
    ("", "empty query"),
    ("-- nothing\n", "empty query"),
    ("SELECT * FROM users FOR UPDATE", "FOR UPDATE"),
    ("SELECT * FROM users FOR KEY SHARE OF users", "FOR UPDATE"),
    ("SELECT now()", "now() depends on the time"),
    ("SELECT CURRENT_DATE", "depends on the time"),
    ("SELECT LOCALTIMESTAMP", "depends on the time"),
    ("SELECT * FROM users WHERE created_at > 'yesterday'", "time-dependent literal"),
    ("SELECT * FROM users WHERE created_at > $$today$$::date", "time-dependent literal"),
    ("SELECT * FROM users WHERE created_at > E'tomorrow'", "time-dependent literal"),
    ("SELECT random()", "random() has side effects"),
    ("SELECT gen_random_uuid()", "has side effects"),
    ("SELECT current_setting('work_mem')", "depends on the session"),
    ("SELECT pg_backend_pid()", "depends on the session"),
    ("SELECT txid_current()", "has side effects"),
    ("SELECT age(created_at) FROM users", "age() with one argument"),
    ("SELECT xmin, * FROM users", "system column xmin"),
    ("SELECT ctid FROM users", "system column ctid"),
    ("SELECT * FROM invoice_seq", "reads sequence public.invoice_seq"),
    ("SELECT last_value FROM invoice_seq", "reads sequence"),
    ("SELECT * FROM pg_stat_activity", "changes without DDL"),
    ("SELECT * FROM pg_catalog.pg_locks", "changes without DDL"),
    ("SELECT relname, reltuples FROM pg_class", "reltuples changes without DDL"),
    ("SELECT * FROM pg_class", "statistics change without DDL"),
    ("SELECT * FROM recent_users", "view public.recent_users: now() depends on the time"),
    ("SELECT * FROM shuffled_users", "view public.shuffled_users: random() has side effects"),
    ("SELECT user_event_count(1)", "stable user-defined function"),
    ("SELECT touch_job(1)", "is volatile"),
    ("SELECT add_one(1)", "is volatile"),  # one overload is volatile: the most volatile counts
    ("SELECT no_such_function(1)", "unknown function no_such_function()"),
    ("SELECT * FROM no_such_table", "unknown relation no_such_table"),
    ("SELECT * FROM nosuchschema.users", "unknown relation nosuchschema.users"),
    ("SHOW work_mem", "SHOW reads session state"),
    ("EXPLAIN SELECT 1", "EXPLAIN output depends on planner statistics"),
    ("COPY users TO STDOUT", "COPY"),
    ("SELECT * INTO new_users FROM users", "write statement"),
    ("WITH d AS (DELETE FROM jobs RETURNING *) SELECT * FROM d", "write statement"),
    ("BEGIN", "txn statement"),
    ("SET search_path = shop", "session statement"),
    ("VACUUM users", "utility statement"),
    ("CREATE INDEX ON users (name)", "ddl statement"),
    ("EXECUTE p(1)", "not understood by the parser"),
    ("DO $$ BEGIN PERFORM 1; END $$", "not understood by the parser"),
    ("SELECT pg_sleep(1)", "pg_sleep() has side effects"),
    ("SELECT nextval('invoice_seq')", "nextval() has side effects"),
])
def test_not_cacheable(sql: str, why: str, corpus_db: tuple[str, Catalog]) -> None:
    a = analyze_statements(sql, SessionFacts(database=corpus_db[0]), corpus_db[1])
    assert not a.cacheable
    assert why in a.why_not, describe(a)


@pytest.mark.parametrize("sql", [
    "SELECT 1",
    "VALUES (1, 'a'), (2, 'b')",
    "SELECT * FROM users WHERE id = $1",
    "SELECT * FROM users WHERE id = 7",
    "TABLE users",
    "SELECT CURRENT_USER, SESSION_USER, current_schema(), current_database(), current_schemas(true)",
    "SELECT count(*) FROM users",
    "SELECT * FROM user_emails",  # a view over a table, nothing volatile
    "SELECT * FROM daily_signups",  # a materialized view changes only on REFRESH
    "SELECT slugify(name) FROM users",  # immutable user function
    "SELECT shop.price_with_tax(price) FROM shop.products",
    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    "SELECT relname FROM pg_class WHERE relkind = 'r'",
    "SELECT tableoid::regclass, id FROM users",  # tableoid only changes with DDL
    "SELECT * FROM measurements WHERE logdate >= '2024-06-01'",
    "SELECT k FROM cache_entries",  # unlogged tables are ordinary for reads
    "WITH RECURSIVE t(n) AS (VALUES (1) UNION ALL SELECT n + 1 FROM t WHERE n < 5) SELECT n FROM t",
    "SELECT * FROM generate_series(1, 3)",
    "SELECT to_char(created_at, 'YYYY') FROM users",  # stable built-in: TimeZone is assumed fixed
    "SELECT * FROM notes",
    "SELECT version()",
])
def test_cacheable(sql: str, corpus_db: tuple[str, Catalog]) -> None:
    a = analyze_statements(sql, SessionFacts(database=corpus_db[0]), corpus_db[1])
    assert a.cacheable, describe(a)
    assert a.kind is Kind.READ


def test_views_read_through(corpus_db: tuple[str, Catalog]) -> None:
    a = analyze_statements("SELECT * FROM user_emails", SessionFacts(), corpus_db[1])
    assert a.tables_read == {"public.user_emails", "public.users"}
    a = analyze_statements("SELECT * FROM daily_signups", SessionFacts(), corpus_db[1])
    assert a.tables_read == {"public.daily_signups"}  # a matview's rows come from REFRESH only


def test_writes_reach_partitions_and_cascades(corpus_db: tuple[str, Catalog]) -> None:
    catalog = corpus_db[1]
    a = analyze_statements("INSERT INTO measurements VALUES (1, '2024-02-01', 3)", SessionFacts(), catalog)
    assert a.tables_written == {"public.measurements", "public.measurements_2024", "public.measurements_2025"}
    a = analyze_statements("DELETE FROM measurements_2024 WHERE city_id = 1", SessionFacts(), catalog)
    assert a.tables_written == {"public.measurements_2024", "public.measurements"}  # not the sibling
    a = analyze_statements("DELETE FROM shop.orders WHERE id = 1", SessionFacts(), catalog)
    assert a.tables_written == {"shop.orders", "shop.order_items"}  # ON DELETE CASCADE
    a = analyze_statements("DELETE FROM users WHERE id = 1", SessionFacts(), catalog)
    assert a.tables_written == {"public.users", "public.events"}


def test_search_path_decides_the_table(corpus_db: tuple[str, Catalog]) -> None:
    catalog = corpus_db[1]
    sql = "SELECT * FROM orders WHERE id = 1"
    assert analyze_statements(sql, SessionFacts(), catalog).tables_read == {"public.orders"}
    shop = SessionFacts(search_path=("shop", "public"))
    assert analyze_statements(sql, shop, catalog).tables_read == {"shop.orders"}
    assert analyze_statements("SELECT * FROM notes", SessionFacts(user="alice"), catalog).tables_read == {
        "alice.notes"}  # "$user"
    assert analyze_statements("SELECT * FROM notes", SessionFacts(user="bob"), catalog).tables_read == {
        "public.notes"}  # no schema bob: skipped
    assert analyze_statements("SELECT * FROM pg_class", SessionFacts(search_path=("public", "pg_catalog")),
                              catalog).tables_read == {"pg_catalog.pg_class"}
    create = analyze_statements("CREATE TABLE fresh (a int)", shop, catalog)
    assert create.tables_written == {"shop.fresh"}
    temp_first = SessionFacts(search_path=("pg_temp", "public"))
    assert analyze_statements("CREATE TABLE fresh (a int)", temp_first, catalog).tables_written == {
        "pg_temp.fresh"}


def test_statement_kind_and_first_words() -> None:
    assert statement_kind("/* x */ (SELECT 1)") == (Kind.READ, set())
    assert statement_kind("SET ROLE alice") == (Kind.SESSION, {Flag.SET_ROLE})
    assert statement_kind("set local session authorization bob")[1] == {Flag.SET_ROLE}
    assert statement_kind("SET SESSION search_path = x")[1] == set()
    assert statement_kind("RESET ROLE")[1] == {Flag.SET_ROLE}
    assert statement_kind("LOCK TABLE t")[1] == {Flag.LOCKING}
    assert statement_kind("COPY t FROM PROGRAM 'x'")[1] == {Flag.COPY_FROM, Flag.COPY_PROGRAM}
    assert statement_kind("PREPARE TRANSACTION 'x'")[0] is Kind.TXN
    assert statement_kind("COMMIT PREPARED 'x'")[0] is Kind.TXN
    assert statement_kind("frobnicate")[0] is Kind.UNKNOWN
    assert first_words("-- c\n/* d */ ((select a from t", 3) == ["select", "a", "from"]
    assert first_words("SET x = 1", 3) == ["set", "x"]
    assert first_words("Vacuum Full", 5) == ["vacuum", "full"]
    assert [t.value for t in tokens("SELECT $a$ x; $a$, E'\\'', \"Q\"\"\", 1.5e3 /* /* */ */ -- c")] == [
        "select", "$a$ x; $a$", ",", "E'\\''", ",", 'Q"', ",", "1.5e3"]
    assert [t.kind for t in tokens("'unterminated")] == ["s"]


# ---- never raises ---------------------------------------------------------------------------------

_FUZZ_CATALOG: list[Catalog] = [Catalog()]
_SQL_WORDS = ["SELECT", "FROM", "WHERE", "WITH", "AS", "(", ")", ",", ";", "'", '"', "$$", "$1", "INSERT",
              "INTO", "VALUES", "UPDATE", "SET", "DELETE", "EXPLAIN", "ANALYZE", "COPY", "TO", "STDOUT",
              "FOR", "LOCK", "CREATE", "TABLE", "DROP", "users", "pg_catalog.pg_class", "now()", "*", "=",
              "/*", "*/", "--", "\n", "LATERAL", "JOIN", "ON", "UNION", "DECLARE", "CURSOR", "PREPARE",
              "EXECUTE", "DO", "BEGIN", "END", "RETURNING", "ORDER BY", "LIMIT", "E'", "U&\"", "::", "[1]"]


def _fuzz_check(sql: str) -> None:
    for catalog in _FUZZ_CATALOG:
        a = analyze_statements(sql, SessionFacts(), catalog)
        assert isinstance(a.kind, Kind)
        assert not a.why_not.startswith("analysis failed"), (sql, a.why_not)  # no internal error at all
        assert a.cacheable is (a.why_not == "")
        if a.cacheable:
            assert a.kind is Kind.READ and a.parsed and a.statements == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_random_text(sql: str) -> None:
    _fuzz_check(sql)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_SQL_WORDS), max_size=40).map(" ".join))
def test_fuzz_sql_words(sql: str) -> None:
    _fuzz_check(sql)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([c["sql"] for c in CASES]), st.data())
def test_fuzz_corpus_mutations(sql: str, data: st.DataObject) -> None:
    """Cut, splice, duplicate and corrupt real statements."""
    n = len(sql)
    i = data.draw(st.integers(0, n))
    j = data.draw(st.integers(i, n))
    op = data.draw(st.sampled_from(["cut", "insert", "dup", "truncate", "swapcase"]))
    if op == "cut":
        sql = sql[:i] + sql[j:]
    elif op == "insert":
        sql = sql[:i] + data.draw(st.sampled_from([*_SQL_WORDS, "\x00", "\\", "é", "\u2028"])) + sql[i:]
    elif op == "dup":
        sql = sql[:j] + sql[i:j] + sql[j:]
    elif op == "truncate":
        sql = sql[:i]
    else:
        sql = sql[:i] + sql[i:j].swapcase() + sql[j:]
    _fuzz_check(sql)


def test_fuzz_with_loaded_catalog(corpus_db: tuple[str, Catalog]) -> None:
    """The fuzz checks above, once more with the corpus catalog, on every corpus text cut at
    a few places (deterministic)."""
    _FUZZ_CATALOG.append(corpus_db[1])
    try:
        for case in CASES:
            sql = case["sql"]
            for cut in range(0, len(sql), max(1, len(sql) // 7)):
                _fuzz_check(sql[:cut])
                _fuzz_check(sql[cut:])
    finally:
        _FUZZ_CATALOG.pop()


def test_deep_nesting_does_not_raise() -> None:
    for sql in ["SELECT " + "(" * 3000 + "1" + ")" * 3000, "SELECT " + "-" * 10000 + "1",
                "SELECT " + " + ".join(["1"] * 5000), "(" * 100000]:
        a = analyze_statements(sql, SessionFacts(), Catalog())
        assert isinstance(a.kind, Kind)


# ---- cost -----------------------------------------------------------------------------------------


def test_cost_is_reported(corpus_db: tuple[str, Catalog], capsys: pytest.CaptureFixture[str]) -> None:
    """Microseconds per analyze_statements call (parse included, and reusing a parse)."""
    catalog = corpus_db[1]
    by_id = {c["id"]: c["sql"] for c in CASES}
    classes = {"point select": by_id["pgbench-select-only"], "join": by_id["agent-join-aggregate"],
               "TPC-H Q1": by_id["tpch-q1"], "TPC-H Q9": by_id["tpch-q9"], "DDL": by_id["ddl-create-table"],
               "catalog query": by_id["psql-d-table-columns"]}
    facts = SessionFacts()
    lines = []
    for name, sql in classes.items():
        trees = parse(sql)
        costs = []
        for given_trees in (None, trees):
            analyze_statements(sql, facts, catalog, given_trees)
            n = 20
            start = time.perf_counter()
            for _ in range(n):
                analyze_statements(sql, facts, catalog, given_trees)
            costs.append((time.perf_counter() - start) / n * 1e6)
        lines.append(f"{name:14} {costs[0]:8.0f} us with parse {costs[1]:8.0f} us given the parse")
    with capsys.disabled():
        print("\nanalyze_statements cost:\n  " + "\n  ".join(lines))
