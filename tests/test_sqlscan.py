"""Tests of planner.sqlscan: the lexer-level session-state scanner."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from planner.sqlscan import PLAIN, SessionEffect, scan, scan_cached, split_statements

S = tuple[tuple[str, str | None], ...]

# (sql, pin reason or None, settings, discards, statements)
CASES: list[tuple[str, str | None, S, bool, int]] = [
    # --- SET ---------------------------------------------------------------------------
    ("SET timezone TO 'UTC'", None, (("timezone", "'UTC'"),), False, 1),
    ("SET timezone = 'UTC'", None, (("timezone", "'UTC'"),), False, 1),
    ("set TimeZone='UTC';", None, (("timezone", "'UTC'"),), False, 1),
    ("SET SESSION timezone TO 'UTC'", None, (("timezone", "'UTC'"),), False, 1),
    ("SET/**/timezone TO 'UTC'", None, (("timezone", "'UTC'"),), False, 1),
    ("SET -- c\n timezone /* x /* y */ */ TO\n 'UTC'  -- tail", None,
     (("timezone", "'UTC'"),), False, 1),
    ("SET statement_timeout TO 1000", None, (("statement_timeout", "1000"),), False, 1),
    ("SET statement_timeout TO DEFAULT", None, (("statement_timeout", None),), False, 1),
    ("SET statement_timeout = default", None, (("statement_timeout", None),), False, 1),
    ("SET application_name TO 'DEFAULT'", None, (("application_name", "'DEFAULT'"),), False, 1),
    ("SET search_path TO 'a', 'b'", None, (("search_path", "'a', 'b'"),), False, 1),
    ('SET search_path = public, "My Schema"', None,
     (("search_path", 'public, "My Schema"'),), False, 1),
    ("SET pgsluice.max_staleness = '5s'", None, (("pgsluice.max_staleness", "'5s'"),), False, 1),
    ("SET MyApp.X TO 42", None, (("myapp.x", "42"),), False, 1),
    ('SET "MyApp"."X" TO 42', None, (("myapp.x", "42"),), False, 1),  # names are case-insensitive
    ("SET work_mem TO '64MB'", None, (("work_mem", "'64MB'"),), False, 1),
    ("SET enable_seqscan = off", None, (("enable_seqscan", "off"),), False, 1),
    ("SET extra_float_digits = -1", None, (("extra_float_digits", "-1"),), False, 1),
    ("SET x TO $$dollar$$", None, (("x", "$$dollar$$"),), False, 1),
    ("SET TIME ZONE 'Europe/Paris'", None, (("timezone", "'Europe/Paris'"),), False, 1),
    ("set time zone -7", None, (("timezone", "-7"),), False, 1),
    ("SET TIME ZONE LOCAL", None, (("timezone", None),), False, 1),
    ("SET TIME ZONE DEFAULT", None, (("timezone", None),), False, 1),
    ("SET TIME ZONE INTERVAL '+02:00' HOUR TO MINUTE", "SET TIME ZONE INTERVAL", (), False, 1),
    ("SET SESSION TIME ZONE 'UTC'", None, (("timezone", "'UTC'"),), False, 1),
    ("SET SCHEMA 'app'", None, (("search_path", "'app'"),), False, 1),
    ("SET NAMES 'UTF8'", None, (("client_encoding", "'UTF8'"),), False, 1),
    ("SET NAMES DEFAULT", None, (("client_encoding", None),), False, 1),
    ("SET NAMES", None, (("client_encoding", None),), False, 1),
    ("SET XML OPTION DOCUMENT", None, (("xmloption", "DOCUMENT"),), False, 1),
    ("SET LOCAL timezone TO 'UTC'", None, (), False, 1),
    ("SET LOCAL ROLE alice", None, (), False, 1),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None, (), False, 1),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SET SESSION CHARACTERISTICS", (), False, 1),
    ("SET CONSTRAINTS ALL DEFERRED", None, (), False, 1),
    ("SET ROLE alice", "SET ROLE", (), False, 1),
    ("SET ROLE NONE", "SET ROLE", (), False, 1),
    ("SET SESSION ROLE alice", "SET ROLE", (), False, 1),
    ("set role = 'alice'", "SET ROLE", (), False, 1),
    ('SET "role" TO alice', "SET ROLE", (), False, 1),
    ("SET SESSION AUTHORIZATION alice", "SET SESSION AUTHORIZATION", (), False, 1),
    ("SET SESSION AUTHORIZATION DEFAULT", "SET SESSION AUTHORIZATION", (), False, 1),
    ("SET session_authorization = alice", "SET SESSION AUTHORIZATION", (), False, 1),
    ("SET search_path = pg_temp, public", "pg_temp in search_path",
     (("search_path", "pg_temp, public"),), False, 1),
    ("SET x FROM CURRENT", "SET FROM CURRENT", (), False, 1),
    ("SET x", "unrecognized SET/RESET", (), False, 1),  # malformed: conservative
    # --- RESET -------------------------------------------------------------------------
    ("RESET timezone", None, (("timezone", None),), False, 1),
    ("reset TIMEZONE;", None, (("timezone", None),), False, 1),
    ("RESET TIME ZONE", None, (("timezone", None),), False, 1),
    ("RESET myapp.x", None, (("myapp.x", None),), False, 1),
    ("RESET ALL", None, (("*", None),), False, 1),
    ("RESET ROLE", "RESET ROLE", (), False, 1),
    ("RESET SESSION AUTHORIZATION", "RESET SESSION AUTHORIZATION", (), False, 1),
    ("RESET session_authorization", "RESET SESSION AUTHORIZATION", (), False, 1),
    ("RESET TRANSACTION ISOLATION LEVEL", None, (), False, 1),
    # --- DISCARD / DEALLOCATE ----------------------------------------------------------
    ("DISCARD ALL", None, (("*", None),), True, 1),
    ("discard plans", None, (), True, 1),
    ("DISCARD TEMP", None, (), False, 1),
    ("DISCARD TEMPORARY", None, (), False, 1),
    ("DISCARD SEQUENCES", None, (), False, 1),
    ("DEALLOCATE ALL", None, (), True, 1),
    ("DEALLOCATE PREPARE ALL", None, (), True, 1),
    ("DEALLOCATE stmt1", None, (), False, 1),  # removes state: no pin
    ("DEALLOCATE PREPARE stmt1", None, (), False, 1),
    ('DEALLOCATE "all"', None, (), False, 1),
    ("DEALLOCATE prepare", None, (), False, 1),
    # --- LISTEN / NOTIFY / LOAD --------------------------------------------------------
    ("LISTEN chan", "LISTEN", (), False, 1),
    ('listen "Chan"', "LISTEN", (), False, 1),
    ("UNLISTEN chan", None, (), False, 1),
    ("UNLISTEN *", None, (), False, 1),
    ("NOTIFY chan, 'payload'", None, (), False, 1),
    ("SELECT pg_notify('chan', 'x')", None, (), False, 1),
    ("LOAD 'auto_explain'", "LOAD", (), False, 1),
    # --- PREPARE / EXECUTE -------------------------------------------------------------
    ("PREPARE p(int) AS SELECT $1", "SQL PREPARE", (), False, 1),
    ("prepare q AS select 1", "SQL PREPARE", (), False, 1),
    ("PREPARE TRANSACTION 'gid-1'", None, (), False, 1),
    ("PREPARE transaction AS SELECT 1", "SQL PREPARE", (), False, 1),
    ("EXECUTE p(1)", None, (), False, 1),
    ("COMMIT PREPARED 'gid-1'", None, (), False, 1),
    # --- DECLARE -----------------------------------------------------------------------
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DECLARE WITH HOLD", (), False, 1),
    ("declare c binary no scroll cursor with hold for select 1", "DECLARE WITH HOLD", (), False, 1),
    ("DECLARE c CURSOR WITH/**/HOLD FOR SELECT 1", "DECLARE WITH HOLD", (), False, 1),
    ("DECLARE c CURSOR FOR SELECT 1", None, (), False, 1),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", None, (), False, 1),
    ("DECLARE c CURSOR FOR WITH hold AS (SELECT 1) SELECT * FROM hold", None, (), False, 1),
    # --- temporary tables --------------------------------------------------------------
    ("CREATE TEMP TABLE t (x int)", "temporary table", (), False, 1),
    ("CREATE TEMPORARY TABLE t AS SELECT 1", "temporary table", (), False, 1),
    ("create global temporary table t (x int)", "temporary table", (), False, 1),
    ("CREATE LOCAL TEMP TABLE t (x int)", "temporary table", (), False, 1),
    ("CREATE TEMP VIEW v AS SELECT 1", "temporary table", (), False, 1),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", "temporary table", (), False, 1),
    ("CREATE TEMPORARY SEQUENCE s", "temporary table", (), False, 1),
    ("CREATE /* c */ TEMP TABLE t ()", "temporary table", (), False, 1),
    ("SELECT 1 INTO TEMP t", "temporary table", (), False, 1),
    ("SELECT * INTO TEMPORARY TABLE t FROM x", "temporary table", (), False, 1),
    ("SELECT 1 AS a INTO LOCAL TEMP t", "temporary table", (), False, 1),
    ("EXPLAIN ANALYZE CREATE TEMP TABLE t AS SELECT 1", "temporary table", (), False, 1),
    ("CREATE TABLE pg_temp.t (x int)", "temporary table", (), False, 1),
    ('SELECT * FROM "pg_temp".t', "temporary table", (), False, 1),
    ("INSERT INTO pg_temp_3.t VALUES (1)", "temporary table", (), False, 1),
    ("CREATE TABLE t (x int)", None, (), False, 1),
    ("CREATE TABLE temp (x int)", None, (), False, 1),
    ("INSERT INTO temp VALUES (1)", None, (), False, 1),
    ("SELECT 1 INTO t", None, (), False, 1),
    ("SELECT * FROM templates", None, (), False, 1),
    ("SELECT pg_temp FROM t", None, (), False, 1),
    # --- functions ---------------------------------------------------------------------
    ("SELECT pg_advisory_lock(1)", "session advisory lock", (), False, 1),
    ("SELECT pg_advisory_lock_shared(1, 2)", "session advisory lock", (), False, 1),
    ("select PG_TRY_ADVISORY_LOCK(42)", "session advisory lock", (), False, 1),
    ("SELECT pg_try_advisory_lock_shared(1)", "session advisory lock", (), False, 1),
    ("SELECT pg_catalog.pg_advisory_lock (1)", "session advisory lock", (), False, 1),
    ("SELECT pg_advisory_lock/* c */(1)", "session advisory lock", (), False, 1),
    ('SELECT "pg_advisory_lock"(1)', "session advisory lock", (), False, 1),
    ('SELECT U&"pg_advisory\\005flock"(1)', "U& identifier", (), False, 1),
    ("SELECT U&\"pg_advisory!005flock\" UESCAPE '!' (1)", "U& identifier", (), False, 1),
    ('SELECT U&"pg\\005ftemp".t', "U& identifier", (), False, 1),
    ('SELECT U&"col" FROM t', None, (), False, 1),
    ("SELECT U&'\\0041' AS a", None, (), False, 1),
    ("SELECT x FROM t WHERE pg_try_advisory_lock(t.id)", "session advisory lock", (), False, 1),
    ("SELECT pg_advisory_xact_lock(1)", None, (), False, 1),
    ("SELECT pg_try_advisory_xact_lock_shared(1)", None, (), False, 1),
    ("SELECT pg_advisory_unlock(1)", None, (), False, 1),
    ("SELECT pg_advisory_unlock_all()", None, (), False, 1),
    ("SELECT pg_advisory_lock FROM t", None, (), False, 1),
    ("SELECT set_config('search_path', 'x', false)", "set_config", (), False, 1),
    ("SELECT set_config('a.b', 'x', true)", "set_config", (), False, 1),
    ("SELECT 1 FROM t WHERE set_config('a.b', t.v, false) IS NOT NULL", "set_config", (), False, 1),
    ("SELECT current_setting('a.b')", None, (), False, 1),
    # --- DO blocks ---------------------------------------------------------------------
    ("DO $$BEGIN PERFORM set_config('a.b', 'c', false); END$$", "DO block", (), False, 1),
    ("DO $do$ BEGIN EXECUTE 'LIS' || 'TEN x'; END $do$", "DO block", (), False, 1),
    ("DO LANGUAGE plpgsql $$BEGIN RAISE NOTICE 'hi'; END$$", None, (), False, 1),
    # --- keywords hidden in literals, comments, identifiers ----------------------------
    ("SELECT 'LISTEN x; SET ROLE y'", None, (), False, 1),
    ("SELECT 'it''s; LISTEN x'", None, (), False, 1),
    ("SELECT E'it\\'s; LISTEN x'", None, (), False, 1),
    ("SELECT E'\\\\'; LISTEN x", "LISTEN", (), False, 2),
    ("SELECT $$; LISTEN x; SET role y$$", None, (), False, 1),
    ("SELECT $tag$ $$; LISTEN x; $$ $tag$", None, (), False, 1),
    ("SELECT $a$ $b$ ; LISTEN x $b$ $a$", None, (), False, 1),
    ("SELECT 1 -- ; LISTEN x", None, (), False, 1),
    ("SELECT 1 /* ; LISTEN x /* nested */ ; SET role y */", None, (), False, 1),
    ('SELECT "LISTEN; x" FROM "SET ROLE"', None, (), False, 1),
    ('SELECT "pg_advisory_lock(1)" FROM t', None, (), False, 1),
    ("SELECT 'pg_advisory_lock(1)', 'set_config(1)', 'pg_temp.t'", None, (), False, 1),
    ("SELECT 'CREATE TEMP TABLE t'", None, (), False, 1),
    ("SELECT '/*'; LISTEN x; SELECT '*/'", "LISTEN", (), False, 3),
    ("SELECT 'a'\n'; LISTEN x; --'", None, (), False, 1),  # string continuation
    ("SELECT E'a'\n'\\''; LISTEN x; --'", "LISTEN", (), False, 2),  # E rules continue
    ("UPDATE t SET x = 1", None, (), False, 1),
    ("ALTER ROLE r SET search_path = x", None, (), False, 1),
    ("SELECT offset_col FROM dataset OFFSET 5", None, (), False, 1),
    ("SELECT a$$b FROM t; LISTEN x", "LISTEN", (), False, 2),  # $ inside an identifier
    ("SELECT $1; LISTEN x", "LISTEN", (), False, 2),
    # --- multiple statements -----------------------------------------------------------
    ("SELECT 1; SELECT 2", None, (), False, 2),
    ("SELECT 1;;; SELECT 2;", None, (), False, 2),
    ("BEGIN; SET timezone TO 'UTC'; SET search_path = app; COMMIT", None,
     (("timezone", "'UTC'"), ("search_path", "app")), False, 4),
    ("SET a.b = 1; LISTEN x; SET ROLE y", "LISTEN", (("a.b", "1"),), False, 3),
    ("DISCARD ALL; SET x.y TO 2", None, (("*", None), ("x.y", "2")), True, 2),
    ("RESET ALL; DEALLOCATE ALL", None, (("*", None),), True, 2),
    ("SELECT 1; SELECT pg_advisory_lock(1); LISTEN x", "session advisory lock", (), False, 3),
    ("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; "
     "SELECT CASE WHEN true THEN 2 END; END; SELECT f()", None, (), False, 2),
    ("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC INSERT INTO t VALUES (1); END",
     None, (), False, 1),
    ("CREATE FUNCTION begin() RETURNS int AS 'SELECT 1' LANGUAGE sql; LISTEN x", "LISTEN",
     (), False, 2),
    # --- empty -------------------------------------------------------------------------
    ("", None, (), False, 0),
    ("   ", None, (), False, 0),
    (";", None, (), False, 0),
    ("-- only a comment", None, (), False, 0),
    ("/* set role x */ ;", None, (), False, 0),
]


@pytest.mark.parametrize(("sql", "pin", "sets", "discards", "count"), CASES)
def test_scan(sql: str, pin: str | None, sets: S, discards: bool, count: int) -> None:
    assert scan(sql) == SessionEffect(pin, sets, discards, count)
    assert scan(sql.upper() if "'" not in sql and '"' not in sql else sql).pin_reason == pin


@pytest.mark.parametrize(
    "sql", ["SELECT 1", "select * from t where a = 1;", "SELECT 1;  \n", "INSERT INTO t VALUES (1)"]
)
def test_fast_path_returns_plain(sql: str) -> None:
    assert scan(sql) is PLAIN


def test_plain_value() -> None:
    assert SessionEffect(None, (), False, 1) == PLAIN
    assert scan("SELECT 1") is PLAIN
    assert scan("SELECT '1;2'") is PLAIN  # lexed (contains ';'), still the shared value
    assert scan("SELECT 1; SELECT 2") == SessionEffect(None, (), False, 2)


def test_scan_cached() -> None:
    sql = "SET timezone TO 'UTC'; LISTEN x"
    assert scan_cached(sql) is scan_cached(sql)
    assert scan_cached(sql) == scan(sql)


def test_standard_conforming_strings_off() -> None:
    sql = "SELECT 'a\\'; LISTEN x; --'"
    assert scan(sql).pin_reason == "LISTEN"  # scs on: 'a\' ends at the second quote
    sql = "SELECT 'a\\''; LISTEN x; --'"
    assert scan(sql).pin_reason is None  # scs on: a single literal
    assert scan(sql, standard_conforming_strings=False).pin_reason == "LISTEN"
    assert scan_cached(sql, standard_conforming_strings=False).pin_reason == "LISTEN"


@pytest.mark.parametrize(
    ("sql", "parts"),
    [
        ("SELECT 1", ["SELECT 1"]),
        ("  SELECT 1 ;\n SELECT ';' ;; -- end", ["SELECT 1", "SELECT ';'"]),
        ("SELECT $$a;b$$; /* x; */ SELECT 2", ["SELECT $$a;b$$", "/* x; */ SELECT 2"]),
        ("", []),
        (" ; ;", []),
        (
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; SELECT 2",
            ["CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END", "SELECT 2"],
        ),
    ],
)
def test_split_statements(sql: str, parts: list[str]) -> None:
    assert split_statements(sql) == parts


def test_large_text_is_fast_enough() -> None:
    sql = "SELECT " + ", ".join(f"'v{i};set role x' AS c{i}" for i in range(5000)) + "; SET a.b = 1"
    eff = scan(sql)
    assert eff.pin_reason is None
    assert eff.settings == (("a.b", "1"),)
    assert eff.statements == 2


def test_unterminated_input_does_not_raise() -> None:
    for sql in ["SELECT 'abc", 'SELECT "abc', "SELECT $$abc", "SELECT /* abc", "SELECT E'\\",
                "SET", "RESET", "DEALLOCATE", "SELECT U&\"x\" UESCAPE", "SET x TO", "DECLARE"]:
        scan(sql)
        split_statements(sql)


_SQLISH = st.lists(
    st.sampled_from([
        "SET", "RESET", "LISTEN", "ROLE", "TO", "=", "'", "''", '"', "$$", "$a$", "E'", "\\",
        "/*", "*/", "--", "\n", " ", ";", "(", ")", ".", "pg_temp", "pg_advisory_lock", "TEMP",
        "CREATE", "INTO", "DO", "U&\"", "UESCAPE", "x", "1", "DEFAULT", "ALL", "DISCARD",
    ]),
    max_size=30,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _SQLISH))
def test_scan_never_raises(text: str) -> None:
    eff = scan(text)
    assert eff.statements >= 0
    assert len(split_statements(text)) == eff.statements
    assert scan(text, standard_conforming_strings=False).statements >= 0


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _SQLISH))
def test_string_literal_never_pins(text: str) -> None:
    literal = "'" + text.replace("'", "''") + "'"
    for sql in (literal, "SELECT " + literal, "SET application_name = " + literal):
        assert scan(sql).pin_reason is None
        assert scan(sql).statements == 1
    assert scan("SELECT 1 -- " + text.replace("\n", " ").replace("\r", " ")).pin_reason is None
