"""Canonical form: cosmetic variants collide, semantic changes never do (hypothesis)."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planner import Planner, SessionFacts
from planner.canonical import Canonical, canonicalize
from planner.normalize import comment_hints, fast_shape


def canon(sql: str) -> Canonical:
    c = canonicalize(sql, fast_shape(sql))
    assert c is not None, sql
    return c


def same(a: str, b: str) -> bool:
    ca, cb = canon(a), canon(b)
    return (ca.sql, ca.params) == (cb.sql, cb.params)


COLLIDE = [
    ("SELECT id FROM users WHERE id = 7", "select ID from USERS where id=7"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id\n  FROM users -- look up\n WHERE /* pk */ id = 7"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE (id = 7)"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE ((((id)) = 7))"),
    ("SELECT * FROM t WHERE a = 1 AND b = 2", "SELECT * FROM t WHERE b = 2 AND a = 1"),
    ("SELECT * FROM t WHERE a = 1 OR b = 2 OR c = 3", "SELECT * FROM t WHERE c = 3 OR (a = 1 OR b = 2)"),
    ("SELECT * FROM t WHERE x IN (3, 1, 2)", "SELECT * FROM t WHERE x IN (1, 2, 3)"),
    ("SELECT u.id FROM users u WHERE u.id = 1", "SELECT id FROM users WHERE id = 1"),
    ("SELECT users.id FROM users WHERE users.id = 1", "SELECT id FROM users AS x WHERE x.id = 1"),
    ("SELECT * FROM t LIMIT 10", "select * from t limit 10;"),
]
DIFFER = [
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE id = 8"),  # params differ
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE id = '7'"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE id = 7.0"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM users WHERE id > 7"),
    ("SELECT id FROM users WHERE id = 7", "SELECT id FROM orders WHERE id = 7"),
    ("SELECT id FROM users WHERE id = 7", "SELECT name FROM users WHERE id = 7"),
    ('SELECT "Id" FROM users', "SELECT id FROM users"),
    ('SELECT * FROM "Users"', "SELECT * FROM users"),
    ("SELECT * FROM t WHERE a < b", "SELECT * FROM t WHERE b < a"),
    ("SELECT * FROM t WHERE (a OR b) AND c", "SELECT * FROM t WHERE a OR (b AND c)"),
    ("SELECT * FROM t WHERE a AND b", "SELECT * FROM t WHERE a OR b"),
    ("SELECT * FROM t WHERE a", "SELECT * FROM t WHERE NOT a"),
    ("SELECT * FROM t ORDER BY 1", "SELECT * FROM t ORDER BY 2"),
    ("SELECT * FROM t ORDER BY a", "SELECT * FROM t ORDER BY a DESC"),
    ("SELECT * FROM t", "SELECT * FROM t LIMIT 5"),
    ("SELECT a - 1 FROM t", "SELECT a - -1 FROM t"),
    ("SELECT u FROM users u", "SELECT u FROM users"),
    ("SELECT x.a FROM t x JOIN t y ON x.id = y.id", "SELECT y.a FROM t x JOIN t y ON x.id = y.id"),
    ("SELECT * FROM t WHERE s = 'a''b'", "SELECT * FROM t WHERE s = 'a'"),
    ("SELECT '2024-01-01'::date", "SELECT '2024-01-01'::timestamp"),
    ("SELECT * FROM t WHERE a = $1", "SELECT * FROM t WHERE a = $2"),
]


@pytest.mark.parametrize(("a", "b"), COLLIDE)
def test_cosmetic_variants_collide(a: str, b: str) -> None:
    assert same(a, b), (canon(a), canon(b))


@pytest.mark.parametrize(("a", "b"), DIFFER)
def test_different_meanings_differ(a: str, b: str) -> None:
    assert not same(a, b), (canon(a), canon(b))


def test_literal_values_are_lifted_with_their_source_text() -> None:
    c = canon("SELECT * FROM t WHERE a = 7 AND b = 'x''y' AND c = 1.50 AND d = $1")
    assert c.sql == "SELECT * FROM t WHERE a = $2 AND b = $3 AND c = $4 AND d = $1"
    assert c.params == ("7", "'x''y'", "1.50")


def test_idempotent() -> None:
    for a, _ in COLLIDE + DIFFER:
        c = canon(a)
        again = canon(c.sql)
        assert again.sql == c.sql, a


def test_fast_shape_and_hints() -> None:
    a = fast_shape("SELECT * FROM t WHERE a = 1 AND b = 'x' -- c")
    b = fast_shape("select *   from t where a = 22 and b = 'yy'")
    assert a is not None and b is not None and a.key == b.key
    assert a.literals == ("1", "'x'") and b.literals == ("22", "'yy'")
    assert fast_shape("SELECT $$x$$") is None
    assert fast_shape("SELECT 'unterminated") is None
    assert comment_hints("/* agent=billing-bot */ SELECT 1 /* pgsluice: max_staleness=5s */") == (
        ("agent", "billing-bot"), ("max_staleness", "5s"))
    assert comment_hints("SELECT '/* agent=no */'") == ()


def test_plan_cache_levels() -> None:
    planner = Planner()
    facts = SessionFacts()
    first = planner.analyze("SELECT * FROM t WHERE id = 1", facts)
    assert planner.analyze("SELECT * FROM t WHERE id = 1", facts) is first
    second = planner.analyze("SELECT * FROM t WHERE id = 2", facts)
    assert (planner.stats.hits, planner.stats.shape_hits, planner.stats.misses) == (1, 1, 1)
    assert second.fingerprint == first.fingerprint and second.params == ("2",)
    assert second.sql == "SELECT * FROM t WHERE id = 2"
    # a different search_path is a different plan-cache entry
    planner.analyze("SELECT * FROM t WHERE id = 1", SessionFacts(search_path=("app",)))
    assert planner.stats.misses == 2


# ---- properties ------------------------------------------------------------------------------

COLUMNS = ["a", "b", "c", "id", "name"]
TABLES = ["t", "users", "orders"]
OPS = ["=", "<", ">", "<>", "<=", ">="]
literal = st.one_of(st.integers(-1000, 1000).map(str),
                    st.text("abcxyz'", max_size=6).map(lambda s: "'" + s.replace("'", "''") + "'"))
predicate = st.tuples(st.sampled_from(COLUMNS), st.sampled_from(OPS), literal)


@st.composite
def query(draw: st.DrawFn) -> tuple[str, list[tuple[str, str, str]], str, str]:
    table = draw(st.sampled_from(TABLES))
    cols = draw(st.lists(st.sampled_from(COLUMNS), min_size=1, max_size=3, unique=True))
    preds = draw(st.lists(predicate, min_size=1, max_size=4))
    joiner = draw(st.sampled_from(["AND", "OR"]))
    where = f" {joiner} ".join(f"{c} {op} {v}" for c, op, v in preds)
    return f"SELECT {', '.join(cols)} FROM {table} WHERE {where}", preds, table, joiner


def cosmetic(sql: str, rnd: st.DrawFn) -> str:
    words = sql.split(" ")
    out = []
    for w in words:
        if "'" not in w and rnd(st.booleans()):
            w = w.upper() if rnd(st.booleans()) else w.lower()
        out.append(w)
    sep = rnd(st.sampled_from([" ", "  ", "\n", " /* c */ "]))
    return sep.join(out) + rnd(st.sampled_from(["", ";", " -- tail"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_cosmetics_and_order_collide(data: st.DataObject) -> None:
    sql, preds, table, joiner = data.draw(query())
    shuffled = data.draw(st.permutations(preds))
    cols = sql[len("SELECT "):sql.index(" FROM")]
    where = f" {joiner} ".join(f"({c} {op} {v})" for c, op, v in shuffled)
    variant = cosmetic(f"SELECT {cols} FROM {table} WHERE {where}", data.draw)
    a, b = canon(sql), canon(variant)
    assert a.sql == b.sql
    assert sorted(a.params) == sorted(b.params)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_property_semantic_changes_differ(data: st.DataObject) -> None:
    sql, preds, table, joiner = data.draw(query())
    i = data.draw(st.integers(0, len(preds) - 1))
    c, op, v = preds[i]
    change = data.draw(st.sampled_from(["column", "op", "table", "joiner", "not"]))
    if change == "column":
        c = data.draw(st.sampled_from([x for x in COLUMNS if x != c]))
    elif change == "op":
        op = data.draw(st.sampled_from([x for x in OPS if x != op]))
    elif change == "table":
        table = data.draw(st.sampled_from([x for x in TABLES if x != table]))
    elif change == "joiner" and len(preds) > 1:
        joiner = "OR" if joiner == "AND" else "AND"
    elif change == "not" or change == "joiner":
        c = f"NOT {c}"
    new_preds = [*preds[:i], (c, op, v), *preds[i + 1:]]
    cols = sql[len("SELECT "):sql.index(" FROM")]
    where = f" {joiner} ".join(f"{c2} {op2} {v2}" for c2, op2, v2 in new_preds)
    other = f"SELECT {cols} FROM {table} WHERE {where}"
    if other != sql:
        assert not same(sql, other), (sql, other)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(query(), st.data())
def test_property_idempotent_and_rebind(q: tuple[str, list[tuple[str, str, str]], str, str],
                                        data: st.DataObject) -> None:
    sql = q[0]
    c = canon(sql)
    assert canon(c.sql).sql == c.sql
    # another text of the same fast shape: rebind gives what a full canonicalize gives
    new_values = [data.draw(literal.filter(lambda x, v=v: (x[0] == "'") == (v[0] == "'")))
                  for _, _, v in q[1]]
    other = sql
    for (col, op, v), nv in zip(q[1], new_values, strict=True):
        other = other.replace(f"{col} {op} {v}", f"{col} {op} {nv}", 1)
    shape_a, shape_b = fast_shape(sql), fast_shape(other)
    assert shape_a is not None and shape_b is not None
    if shape_a.key == shape_b.key:
        rebound = c.rebind(shape_b)
        if rebound is not None:
            assert rebound == canon(other).params, (sql, other)


def test_cli_explain_prints_the_plan() -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "proxy", "explain", "--no-catalog",
         "SELECT u.name FROM users u WHERE u.id = 42 /* agent=probe */"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    lines = dict(line.split(":", 1) for line in out.splitlines())
    assert len(lines["fingerprint"].strip()) == 32
    assert lines["canonical"].strip() == "SELECT name FROM users WHERE id = $1"
    assert lines["params"].strip() == "42"
    assert lines["kind"].strip() == "read"
    assert lines["cacheable"].strip().startswith("no (")  # no catalog: the table is unknown
    assert lines["hints"].strip() == "agent=probe"
