"""Byte fidelity: what a client receives through pgsluice is what it receives from Postgres.

Each case opens one raw connection (tests/rawpg.py) straight to Postgres and one through the
proxy, with the same user, database and startup parameters, runs the same steps on both and
compares every message after login byte for byte. Login is compared as the multiset of
ParameterStatus messages plus everything else after authentication except BackendKeyData
(authentication itself differs by design: Postgres asks for SCRAM or md5, the proxy in
passthrough mode for a cleartext password).

The corpus also checks itself on the direct side: each case lists the SQLSTATEs (in order)
and message types it must produce straight from Postgres, so a case cannot silently
degrade into comparing two identical syntax errors.

The proxy has a pool of two server connections, shared by all cases, so server
connections change hands between cases with different session settings.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest

from proxy.ops.embedded import EmbeddedPostgres
from proxy.pgwire import codes
from proxy.pgwire.decode import parse_error_fields
from tests.rawpg import (
    LoginError,
    Msg,
    PgConn,
    bind,
    close_portal,
    close_statement,
    copy_data,
    copy_done,
    copy_fail,
    describe_portal,
    describe_statement,
    execute,
    first_difference,
    flush,
    parse,
    query,
    render,
    rows,
    sqlstates,
    sync,
    types,
)
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

# Names unique to this run (and process), so parallel or leftover runs never collide.
RUN = f"{os.getpid()}_{secrets.token_hex(3)}"
T = f"fid_{RUN}_things"  # the corpus table
C = f"fid_{RUN}_copy"  # an empty table for COPY FROM and DML (changes are rolled back)
MOOD = f"fid_{RUN}_mood"  # an enum
PAIR = f"fid_{RUN}_pair"  # a composite type
USER, DB = "alice", "app"

_SETUP = f"""
CREATE TYPE {MOOD} AS ENUM ('sad', 'ok', 'happy', 'très content');
CREATE TYPE {PAIR} AS (a int, b text);
CREATE TABLE {T} (id int PRIMARY KEY, mood {MOOD}, pair {PAIR}, tags text[], doc jsonb,
                  email text CONSTRAINT {T}_email_key UNIQUE, at timestamptz);
INSERT INTO {T} VALUES
  (1, 'ok', ROW(1, 'x'), ARRAY['a', 'b "q"', NULL], '{{"k": [1, 2.5, null]}}', 'a@x', '2024-06-01 12:00+00'),
  (2, NULL, NULL, '{{}}', 'null', NULL, NULL),
  (3, 'très content', ROW(NULL, 'with, comma'), ARRAY['\\', '{{}}'], '{{"é": "\\u00e9"}}', 'c@x',
   '0044-03-15 12:00:00+00 BC');
CREATE TABLE {C} (id int NOT NULL, note text);
GRANT ALL ON {T}, {C} TO alice, bob, trusted_user;
"""
_TEARDOWN = f"DROP TABLE IF EXISTS {T}, {C}; DROP TYPE IF EXISTS {PAIR}; DROP TYPE IF EXISTS {MOOD}"


def _direct(pg: EmbeddedPostgres, user: str = "postgres", database: str = DB) -> PgConn:
    return PgConn.connect("127.0.0.1", pg.port, user, PASSWORDS.get(user), database)


@pytest.fixture(scope="module")
def corpus_db(pg: EmbeddedPostgres) -> Iterator[None]:
    """The corpus objects, made and dropped over a direct superuser connection."""
    with _direct(pg) as conn:
        answer = conn.simple(_SETUP)
        assert sqlstates(answer) == [], [render(m) for m in answer]
    yield
    with _direct(pg) as conn:
        answer = conn.simple(_TEARDOWN)
        assert sqlstates(answer) == [], [render(m) for m in answer]


@pytest.fixture(scope="module")
def fid_proxy(corpus_db: None, proxy_factory_module: ProxyFactory) -> ProxyHandle:
    return proxy_factory_module("--pool-max-size", "2")


# ---- cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Send:
    """Raw frontend bytes sent in one write; read up to `readies` ReadyForQuery messages."""

    data: bytes
    readies: int = 1


Step = str | Send  # a str is one simple Query


@dataclass(frozen=True)
class Case:
    id: str
    steps: tuple[Step, ...]
    startup: Mapping[str, str] = field(default_factory=dict)
    errors: tuple[str, ...] = ()  # SQLSTATEs of the direct run's ErrorResponses, in order
    must: str = ""  # message type letters the direct run must contain
    user: str = USER
    database: str = DB
    xfail: str = ""  # a known difference: the reason


def ext(sql: str, params: tuple[bytes | str | None, ...] = (), *, result_formats: tuple[int, ...] = (),
        param_types: tuple[int, ...] = (), param_formats: tuple[int, ...] = (), max_rows: int = 0,
        describe: str = "P") -> Send:
    """An unnamed Parse/Bind/[Describe]/Execute/Sync round."""
    msgs = [parse(b"", sql, param_types)]
    if "S" in describe:
        msgs.append(describe_statement(b""))
    msgs.append(bind(b"", b"", params, param_formats=param_formats, result_formats=result_formats))
    if "P" in describe:
        msgs.append(describe_portal(b""))
    msgs += [execute(b"", max_rows), sync()]
    return Send(b"".join(msgs))


def send(*msgs: bytes, readies: int = 1) -> Send:
    return Send(b"".join(msgs), readies)


# Values of each type, run under every startup-parameter set below.
_VALUES: dict[str, str] = {
    "ints": "SELECT 0::int2, '32767'::int2, '-32768'::int2, 2147483647::int4, '-2147483648'::int4,"
            " 9223372036854775807::int8, '-9223372036854775808'::int8, -1::int8, 42",
    "numeric": "SELECT 3.14159::numeric(10,4), 'NaN'::numeric, 1e40::numeric, -0.000001::numeric,"
               " 12345678901234567890123456789, 0.1000::numeric, 1::numeric(20,10), 2::numeric / 3,"
               " 'Infinity'::numeric, '-Infinity'::numeric, 1.5e-20::numeric(30,25)",
    "float": "SELECT 0.1::float8, 1::float8 / 3, 0.1::float4, 1::float4 / 3, 1e-310::float8,"
             " 'Infinity'::float8, '-Infinity'::float4, 'NaN'::float8, 'NaN'::float4, '-0'::float8,"
             " '-0'::float4, 3.4028235e38::float4, 1.7976931348623157e308::float8,"
             " 123456789.123456789::float8, 1e15::float8, 1e16::float8, 1.401298464324817e-45::float4",
    "text": "SELECT 'plain', '', 'üñíçødé ✓ 日本 🐘', E'tab\\there\\nline\\r', 'quote''s', 'back\\slash',"
            " repeat('xy', 5000), 'e\u0301', '  padded  '::char(12), 'v'::varchar(3), 'nm'::name",
    "bytea": "SELECT '\\x00ff10'::bytea, 'abc\\\\def'::bytea, ''::bytea, 'caf\u00e9'::bytea,"
             " decode(string_agg(lpad(to_hex(g), 2, '0'), '' ORDER BY g), 'hex')"
             " FROM generate_series(0, 255) g",
    "bool": "SELECT true, false, NULL::bool, 'yes'::bool, 'off'::bool",
    "date-time": "SELECT '2024-02-29'::date, 'infinity'::date, '-infinity'::date, '4713-01-01 BC'::date,"
                 " '0001-12-31 BC'::date, '5874897-12-31'::date, '12:34:56.789'::time, '24:00'::time,"
                 " '00:00:00.000001'::time(6), '23:59:59+05:30'::timetz, '00:00:00.5-14:59'::timetz,"
                 " '12:00:00 PST'::timetz",
    "timestamp": "SELECT '2024-03-10 02:30:00'::timestamp, 'infinity'::timestamp, '-infinity'::timestamp,"
                 " '2000-01-01 00:00:00.000001'::timestamp, '0044-03-15 12:00 BC'::timestamp,"
                 " '294276-12-31 23:59:59.999999'::timestamp",
    "timestamptz": "SELECT '2024-06-01 12:00:00+00'::timestamptz,"
                   " '1999-12-31 23:59:59.999999-08'::timestamptz, 'epoch'::timestamptz,"
                   " '0044-03-15 12:00:00+00 BC'::timestamptz, '1900-01-01 00:00+00'::timestamptz,"
                   " '2024-10-06 03:30+00'::timestamptz, 'infinity'::timestamptz, '-infinity'::timestamptz,"
                   " '2024-06-01 12:00:00+00'::timestamptz AT TIME ZONE 'Asia/Kolkata',"
                   " to_char('2024-06-01 12:00:00+00'::timestamptz, 'YYYY-MM-DD HH24:MI:SS TZ OF')",
    "interval": "SELECT '1 year 2 mons 3 days 04:05:06.7'::interval, '-1 day'::interval, '0'::interval,"
                " '-1 year -2 mons +3 days -04:05:06'::interval, '1.5 years'::interval,"
                " 'P1Y2M3DT4H5M6.7S'::interval, '178000000 years'::interval,"
                " '-00:00:00.000001'::interval, 'infinity'::interval, '1 day -1 second'::interval",
    "uuid-json": "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid,"
                 " '{ \"b\": 1,  \"a\": [true, null] }'::json, '{ \"b\": 1,  \"a\": [true, null] }'::jsonb,"
                 " '{\"é\": \"\\u00e9\", \"n\": 1e2}'::jsonb, '[1, 2.50, -0, 1e-5]'::jsonb, 'null'::json,"
                 " to_jsonb('2024-01-01'::date), jsonb_build_object('t', '2024-06-01 12:00+00'::timestamptz)",
    "arrays": "SELECT ARRAY[1, 2, NULL], ARRAY[[1, 2], [3, 4]], ARRAY[[NULL, 'a'], ['b', NULL]],"
              " ARRAY['x y', 'q\"t', NULL, '', 'NULL', 'back\\slash', 'a,b', '{}', ' lead'],"
              " '{}'::int[], '[0:2]={1,2,3}'::int[], ARRAY[1.5::float8, 'NaN'], ARRAY['2024-01-01'::date],"
              f" ARRAY[ROW(1, 'a')::{PAIR}, NULL], ARRAY['2024-06-01 12:00+00'::timestamptz],"
              " ARRAY['1 day'::interval], ARRAY['\\x01'::bytea]",
    "nulls": f"SELECT NULL, NULL::text, NULL::int[], NULL::{PAIR}, ARRAY[NULL]::text[], ROW(NULL, NULL)",
    "composite": "SELECT ROW(1, 'two', NULL, ARRAY[3]), ROW(1, 'with \"quote\"', 'a,b', '')::record,"
                 f" ROW(2, 'y')::{PAIR}, (ROW(2, 'y')::{PAIR}).b, ROW(ROW(1, 2), ARRAY[ROW(3)])",
    "enum": f"SELECT mood, mood < 'happy', pair, (pair).b, enum_range(NULL::{MOOD}), 'sad'::{MOOD}"
            f" FROM {T} ORDER BY id",
    "table": f"SELECT * FROM {T} ORDER BY id",
    "copy-out": f"COPY (SELECT * FROM {T} ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER);"
                f" COPY {T} TO STDOUT; COPY (SELECT * FROM {T} ORDER BY id) TO STDOUT WITH (FORMAT binary)",
}

# Startup parameters: Postgres's defaults, two TimeZones with other date/float/bytea styles,
# and the same kinds of settings through `options`.
_STARTUPS: dict[str, dict[str, str]] = {
    "default": {},
    "saopaulo-sql-iso": {"TimeZone": "America/Sao_Paulo", "DateStyle": "SQL, DMY",
                         "IntervalStyle": "iso_8601", "extra_float_digits": "0", "bytea_output": "escape"},
    "kolkata-german-sqlstd": {"TimeZone": "Asia/Kolkata", "DateStyle": "German",
                              "IntervalStyle": "sql_standard", "extra_float_digits": "1"},
    "options-utc-postgres": {"TimeZone": "UTC", "options": "-c DateStyle=Postgres,DMY "
                             "-c IntervalStyle=postgres_verbose --extra-float-digits=3"},
}

_TYPE_PROBE = (  # one value of each kind whose text depends on a session setting
    "SELECT 0.1::float8, 1::float4 / 3, '-0'::float8, 'NaN'::float4, '\\x00ff27'::bytea,"
    " '2024-02-29 10:11:12.5'::timestamp, '2024-06-01 12:00:00+00'::timestamptz, '2024-02-29'::date,"
    " '1 year 2 mons 3 days 04:05:06.7'::interval, '-1 day -02:00'::interval, '12:00+01'::timetz"
)
_DATE_STYLES = ("ISO, DMY", "SQL, DMY", "SQL, MDY", "Postgres, MDY", "Postgres, DMY", "German", "ISO, YMD")

# Session settings changed with SET (and RESET) between queries: (steps, startup parameters).
_SESSION_SETTINGS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "extra-float-digits": (("SET extra_float_digits = 0", _VALUES["float"], "SET extra_float_digits = 1",
                            _VALUES["float"], "SET extra_float_digits = 3", _VALUES["float"],
                            "SET extra_float_digits = -15", _VALUES["float"]), {}),
    "bytea-output": (("SET bytea_output = 'escape'", _VALUES["bytea"], "SET bytea_output = 'hex'",
                      _VALUES["bytea"]), {}),
    "interval-style": (("SET IntervalStyle = 'iso_8601'", _VALUES["interval"],
                        "SET IntervalStyle = postgres", _VALUES["interval"],
                        "SET IntervalStyle = 'sql_standard'", _VALUES["interval"],
                        "SET IntervalStyle = 'postgres_verbose'", _VALUES["interval"]), {}),
    "date-style": (tuple(s for style in _DATE_STYLES
                         for s in (f"SET DateStyle = '{style}'", _VALUES["date-time"], _VALUES["timestamp"],
                                   _VALUES["timestamptz"])), {}),
    "time-zone": (("SET TimeZone = 'UTC'", _VALUES["timestamptz"], "SET TimeZone = 'America/Sao_Paulo'",
                   _VALUES["timestamptz"], _VALUES["date-time"], "SET TIME ZONE 'Asia/Kolkata'",
                   _VALUES["timestamptz"], f"SELECT at FROM {T} ORDER BY id", "RESET TimeZone",
                   _VALUES["timestamptz"], "SET TimeZone = 'America/Sao_Paulo'", "RESET ALL",
                   "SHOW TimeZone"), {}),
    "time-zone-over-startup": (("SHOW TimeZone", _VALUES["timestamptz"], "SET TimeZone = 'Asia/Kolkata'",
                                _VALUES["timestamptz"], "SET TimeZone = 'UTC'", "SHOW TimeZone"),
                               {"TimeZone": "America/Sao_Paulo"}),
    "multi-statement": (("SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'SQL, DMY'; " + _TYPE_PROBE,
                         _TYPE_PROBE, "SET extra_float_digits = 0; SET IntervalStyle = iso_8601",
                         _TYPE_PROBE), {}),
    "set-local-in-transaction": (("BEGIN", "SET LOCAL TimeZone = 'America/Sao_Paulo'", _TYPE_PROBE,
                                  "COMMIT", _TYPE_PROBE), {}),
    "application-name": (("SET application_name = 'fidélité'", "SHOW application_name",
                          "RESET application_name", "SHOW application_name"), {}),
}

_Corpus = dict[str, tuple[tuple[Step, ...], tuple[str, ...], str]]  # id: (steps, SQLSTATEs, must)

_SIMPLE: _Corpus = {
    "division-by-zero": (("SELECT 1/0",), ("22012",), "E"),
    "syntax-error-position": (("SELEC 1",), ("42601",), "E"),
    "syntax-error-at-end": (("SELECT 1 +",), ("42601",), "E"),
    "undefined-table": (("SELECT * FROM fid_no_such_table",), ("42P01",), "E"),
    "undefined-column-hint": ((f"SELECT idd FROM {T}",), ("42703",), "E"),
    "unique-violation-pkey": ((f"INSERT INTO {T} (id) VALUES (1)",), ("23505",), "E"),
    "unique-violation-named": ((f"INSERT INTO {T} (id, email) VALUES (99, 'a@x')",), ("23505",), "E"),
    "not-null-violation": ((f"INSERT INTO {C} (id, note) VALUES (NULL, 'n')",), ("23502",), "E"),
    "invalid-input": (("SELECT 'x'::int",), ("22P02",), "E"),
    "invalid-enum-input": ((f"SELECT 'meh'::{MOOD}",), ("22P02",), "E"),
    "out-of-range": (("SELECT 32768::int2",), ("22003",), "E"),
    "error-mid-multi-statement": (("SELECT 1; SELECT 1/0; SELECT 3",), ("22012",), "TDCE"),
    "implicit-transaction-rolled-back": ((f"INSERT INTO {C} VALUES (100, 'gone'); SELECT 1/0",
                                          f"SELECT count(*) FROM {C}"), ("22012",), "E"),
    "failed-transaction-25P02": (("BEGIN", "SELECT 1/0", "SELECT 1", "ROLLBACK", "SELECT 'after'"),
                                 ("22012", "25P02"), "E"),
    "failed-transaction-commit": (("BEGIN", "SELECT 1/0", "COMMIT", "SELECT 'after'"), ("22012",), "E"),
    "savepoint-recovery": (("BEGIN", "SAVEPOINT s", "SELECT 1/0", "ROLLBACK TO s", "SELECT 2", "COMMIT"),
                           ("22012",), "E"),
    "error-in-transaction-multi-statement": (("BEGIN; SELECT 1; SELECT 1/0; SELECT 2", "SELECT 3",
                                              "ROLLBACK"), ("22012", "25P02"), "E"),
    "empty-query": (("",), (), "I"),
    "semicolon-only": ((";",), (), "I"),
    "comment-only": (("-- nothing here\n/* nor here */",), (), "I"),
    "empty-statements-between": (("SELECT 1;; ; SELECT 2;",), (), "D"),
    "notice-raise": (("DO $$BEGIN RAISE NOTICE 'hello % %', 1, 'two'; RAISE WARNING 'careful';"
                      " RAISE INFO 'info' USING DETAIL = 'd', HINT = 'h'; END$$",), (), "N"),
    "notice-drop-if-exists": (("DROP TABLE IF EXISTS fid_never_there",), (), "N"),
    "notice-client-min-messages": (("SET client_min_messages = warning",
                                    "DO $$BEGIN RAISE NOTICE 'hidden'; RAISE WARNING 'shown'; END$$",
                                    "RESET client_min_messages", "DO $$BEGIN RAISE NOTICE 'again'; END$$"),
                                   (), "N"),
    "warning-transaction-commands": (("ROLLBACK", "COMMIT", "BEGIN", "BEGIN", "COMMIT"), (), "N"),
    "raise-exception-fields": (("DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'custom',"
                                " DETAIL = 'd', HINT = 'h', SCHEMA = 's', TABLE = 't', COLUMN = 'c',"
                                " CONSTRAINT = 'k', DATATYPE = 'dt'; END$$",), ("P0001",), "E"),
    "multiple-result-sets": (("SELECT 1 AS a; SELECT 'b' AS b, 2; SHOW DateStyle; VALUES (1), (2)",),
                             (), "T"),
    "command-tags": (("BEGIN", f"INSERT INTO {C} VALUES (1, 'a'), (2, 'b') RETURNING *",
                      f"UPDATE {C} SET note = note || '!'", f"DELETE FROM {C} WHERE id = 1",
                      f"SELECT * FROM {C}", f"CREATE TABLE {C}_tmp (x int)", f"DROP TABLE {C}_tmp",
                      "ROLLBACK"), (), "C"),
    "copy-in": (("BEGIN", send(query(f"COPY {C} FROM STDIN"), copy_data(b"1\tone\n2\t\\N\n"),
                               copy_data(b"3\tthr"), copy_data(b"ee\n"), copy_done()),
                 f"SELECT * FROM {C} ORDER BY id", "ROLLBACK"), (), "G"),
    "copy-in-fail": ((send(query(f"COPY {C} FROM STDIN"), copy_data(b"1\tone\n"),
                           copy_fail("client gave up")), f"SELECT count(*) FROM {C}"), ("57014",), "G"),
    "copy-in-bad-data": ((send(query(f"COPY {C} FROM STDIN WITH (FORMAT csv)"),
                               copy_data(b"1,ok\nx,bad\n"), copy_done()),), ("22P02",), "G"),
    "client-encoding-latin1": (("SET client_encoding = 'LATIN1'",
                                Send(query(b"SELECT 'caf\xe9', 'na\xefve'")),
                                "SELECT chr(233), upper(chr(255))", "SELECT chr(26085)",
                                "SET client_encoding = 'UTF8'", "SELECT 'café', chr(26085)"),
                               ("22P05",), "D"),
    # Loading plpgsql (any DO block) adds plpgsql.* settings to a server connection for good; the
    # proxy's pooled connections have run DO blocks, a fresh direct connection has not.
    "pg-settings-values": (("SELECT name, setting FROM pg_settings WHERE name NOT LIKE 'plpgsql.%'"
                            " ORDER BY name",), (), "D"),
}

_EXTENDED: _Corpus = {
    "text-params-text-results": ((ext("SELECT $1::int + 1, $2::text, $3::date",
                                      (b"41", None, "2024-02-29")),), (), "12TDCZ"),
    "binary-results": ((ext("SELECT 1::int2, 2::int4, 3::int8, 1.5::float8, 2.5::float4, 'x'::text, true,"
                            " '2024-01-01'::date, '2024-01-01 10:00+00'::timestamptz, '\\x01'::bytea,"
                            " 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, 12.34::numeric, ARRAY[1, NULL],"
                            " '{\"a\":1}'::jsonb, '1 day'::interval, NULL::int, '12:00'::time,"
                            f" 'ok'::{MOOD}, ROW(1, 'b')::{PAIR}, 'NaN'::numeric, '-Infinity'::float8",
                            result_formats=(1,)),), (), "D"),
    "binary-table": ((ext(f"SELECT * FROM {T} ORDER BY id", result_formats=(1,)),), (), "D"),
    "mixed-formats-per-column": ((ext("SELECT 1::int4, 'two'::text, 3.5::float8",
                                      result_formats=(1, 0, 1)),), (), "D"),
    "binary-params": ((ext("SELECT $1 + 1, $2 || '!', $3",
                           (struct.pack("!i", 41), b"hi", struct.pack("!q", -1)), param_types=(23, 25, 20),
                           param_formats=(1, 0, 1), result_formats=(0,)),), (), "D"),
    "describe-statement-inferred-types": (
        (ext(f"SELECT id, mood, tags FROM {T} WHERE id >= $1 AND mood <> $2 ORDER BY id", (b"1", b"sad"),
             describe="SP"),), (), "tT"),
    "describe-statement-no-data": ((ext(f"UPDATE {T} SET id = id WHERE id = $1", (b"0",), describe="SP"),),
                                   (), "tn"),
    "named-statement-reused": (
        (send(parse("fid_s1", f"SELECT id, mood, tags FROM {T} WHERE id >= $1 ORDER BY id", (23,)),
              describe_statement("fid_s1"), sync()),
         send(bind("", "fid_s1", (b"1",)), execute(""), bind("", "fid_s1", (b"2",), result_formats=(1,)),
              execute(""), sync()),
         send(close_statement("fid_s1"), sync()),
         send(bind("", "fid_s1", (b"1",)), execute(""), sync())), ("26000",), "tT2D3"),
    "unnamed-statement-across-syncs": (
        (send(parse("", "SELECT $1::text || 'x'"), sync()),
         send(bind("", "", (b"a",)), execute(""), sync()),
         send(bind("", "", (b"b",)), describe_portal(""), execute(""), sync())), (), "1D"),
    "unnamed-statement-gone-after-query": (
        (send(parse("", "SELECT 1"), sync()), "SELECT 2", send(bind("", ""), execute(""), sync())),
        ("26000",), "1"),
    "describe-unknown-statement": ((send(describe_statement("fid_nope"), sync()),), ("26000",), "E"),
    "bind-unknown-statement": ((send(bind("", "fid_nope"), execute(""), sync()),), ("26000",), "E"),
    "execute-unknown-portal": ((send(execute("fid_nope"), sync()),), ("34000",), "E"),
    "close-unknown-is-fine": ((send(close_statement("fid_nope"), close_portal("fid_nope"), sync()),),
                              (), "3"),
    "portal-suspended": ((send(parse("", "SELECT g, g::text FROM generate_series(1, 5) g"), bind("p1", ""),
                               describe_portal("p1"), execute("p1", 2), execute("p1", 2), execute("p1", 0),
                               sync()),), (), "s"),
    "portal-suspended-binary": ((ext("SELECT g FROM generate_series(1, 3) g", result_formats=(1,),
                                     max_rows=2),), (), "s"),
    "portal-across-syncs-in-transaction": (
        ("BEGIN",
         send(parse("fid_cur", "SELECT g FROM generate_series(1, 6) g"), bind("c1", "fid_cur"),
              execute("c1", 2), sync()),
         send(execute("c1", 2), sync()),
         send(close_portal("c1"), execute("c1", 1), sync()),
         "COMMIT", send(close_statement("fid_cur"), sync())), ("34000",), "s"),
    "dml-returning-row-limit": (("BEGIN", ext(f"INSERT INTO {C} SELECT g, 'n' FROM generate_series(1, 4) g"
                                              " RETURNING id", max_rows=3), "ROLLBACK"), (), "s"),
    "error-at-parse-skips-to-sync": ((send(parse("", "SELEC 1"), bind("", ""), execute(""), sync()),
                                      ext("SELECT 'still fine'")), ("42601",), "E"),
    "error-at-bind": ((ext("SELECT $1::int", (b"nope",)),), ("22P02",), "E"),
    "error-wrong-param-count": ((ext("SELECT $1::int, $2::int", (b"1",)),), ("08P01",), "E"),
    "error-at-execute": ((ext("SELECT 1/0"),), ("22012",), "E"),
    "error-in-transaction-batches": (("BEGIN", ext("SELECT 1/0"), ext("SELECT 1"), "ROLLBACK"),
                                     ("22012", "25P02"), "E"),
    "empty-query": ((ext(""),), (), "I"),
    "utility-no-data": ((ext("SET LOCAL work_mem = '8MB'"), ext("SET extra_float_digits = 2"),
                         ext("SELECT 0.1::float8"), ext("SET TimeZone = 'Asia/Kolkata'"),
                         ext("SELECT '2024-06-01 12:00+00'::timestamptz")), (), "nS"),
    "notice-in-extended": ((ext("DO $$BEGIN RAISE NOTICE 'from extended'; END$$"),), (), "N"),
    "flush-midway": ((send(parse("", "SELECT 1"), bind("", ""), flush(), describe_portal(""), execute(""),
                           flush(), sync()),), (), "D"),
    "pipelined-syncs": ((send(ext("SELECT 1").data, ext("SELECT 1/0").data, ext("SELECT 3").data,
                              readies=3),), ("22012",), "D"),
    "pipelined-simple-queries": ((send(query("SELECT 1"), query("SELECT 1/0"), query("SELECT 'x'"),
                                       query(""), readies=4),), ("22012",), "I"),
    "simple-query-between-extended": ((send(parse("", "SELECT 1"), bind("", ""), execute(""), sync(),
                                            query("SELECT 2"), readies=2),), (), "D"),
}

# Known differences: each is a strict xfail, so fixing the proxy turns it into a failure to update.
_DUPLICATE_PARSE = ("proxy bug: a Parse reusing the name of an existing prepared statement gets "
                    "ParseComplete (and silently replaces it) instead of Postgres's 42P05; relay._parse "
                    "overwrites s.statements[name] without checking")
_SQL_PREPARE_NAMESPACE = ("proxy bug: protocol-level statements get server-side names, so SQL PREPARE of "
                          "a name already used by a Parse succeeds (Postgres: 42P05) and EXECUTE runs it")
_RESET_STARTUP = ("proxy deviation (README known limitation on RESET of startup parameters): the reply "
                  "to RESET/SET ... TO DEFAULT reports the server default in ParameterStatus "
                  "(TimeZone=Etc/UTC) and the startup value only arrives after ReadyForQuery")
_OPTIONS_PRECEDENCE = ("proxy bug: a setting given both as a startup parameter and in `options` takes the "
                       "`options` value (settings_from_startup applies options last); Postgres applies "
                       "options first, so the explicit startup parameter wins")
_SAO_PAULO = {"TimeZone": "America/Sao_Paulo"}
# id: (steps, SQLSTATEs, must, startup parameters, reason)
_KNOWN: dict[str, tuple[tuple[Step, ...], tuple[str, ...], str, dict[str, str], str]] = {
    "duplicate-statement-name": ((send(parse("fid_dup", "SELECT 1"), sync()),
                                  send(parse("fid_dup", "SELECT 2"), sync()),
                                  send(bind("", "fid_dup"), execute(""), sync()),
                                  send(close_statement("fid_dup"), sync())), ("42P05",), "13", {},
                                 _DUPLICATE_PARSE),
    "sql-prepare-shares-namespace": ((send(parse("fid_both", "SELECT 1"), sync()),
                                      "PREPARE fid_both AS SELECT 2", "EXECUTE fid_both",
                                      send(bind("", "fid_both"), execute(""), sync())), ("42P05",), "1", {},
                                     _SQL_PREPARE_NAMESPACE),
    "reset-startup-parameter": (("SET TimeZone = 'Asia/Kolkata'", "RESET TimeZone", "SHOW TimeZone"),
                                (), "S", _SAO_PAULO, _RESET_STARTUP),
    "set-default-startup-parameter": (("SET TimeZone = 'Asia/Kolkata'", "SET TimeZone TO DEFAULT",
                                       "SHOW TimeZone"), (), "S", _SAO_PAULO, _RESET_STARTUP),
    "startup-parameter-beats-options": (("SHOW TimeZone", "SHOW DateStyle", _TYPE_PROBE), (), "D",
                                        {"options": "-c TimeZone=UTC -c DateStyle=Postgres,DMY",
                                         "TimeZone": "Asia/Kolkata", "DateStyle": "SQL"},
                                        _OPTIONS_PRECEDENCE),
}

CASES: list[Case] = []
for _name, _sql in _VALUES.items():
    for _sname, _params in _STARTUPS.items():
        CASES.append(Case(f"types-{_name}-{_sname}", (_sql,), _params, must="H" if "copy" in _name else "D"))
for _name, (_ssteps, _startup) in _SESSION_SETTINGS.items():
    CASES.append(Case(f"set-{_name}", _ssteps, _startup, must="D"))
for _prefix, _corpus in (("simple", _SIMPLE), ("extended", _EXTENDED)):
    for _name, (_steps, _states, _must) in _corpus.items():
        CASES.append(Case(f"{_prefix}-{_name}", _steps, errors=_states, must=_must))
for _name, (_steps, _states, _must, _startup, _reason) in _KNOWN.items():
    CASES.append(Case(f"known-{_name}", _steps, _startup, errors=_states, must=_must, xfail=_reason))
# The same small script for every kind of login Postgres does here.
_WHO = ("SELECT current_user, session_user, current_database(), current_setting('is_superuser'),"
        " current_setting('search_path'), current_setting('application_name')")
CASES += [
    Case("login-scram-alice-app", (_WHO,), must="D"),
    Case("login-scram-bob-app", (_WHO,), user="bob", must="D"),
    Case("login-scram-superuser", (_WHO, "SHOW is_superuser"), user="postgres", database="postgres",
         must="D"),
    Case("login-md5-user", (_WHO,), user="md5_user", database="postgres", must="D"),
    Case("login-trust", (_WHO,), user="trusted_user", database="postgres", must="D"),
    Case("login-no-database-param", (_WHO,), user="postgres", database="", must="D"),
    Case("login-startup-params", (_WHO, _TYPE_PROBE, Send(query(b"SELECT 'caf\xe9'")), "SELECT chr(10003)"),
         {"application_name": "fidélité", "search_path": f"public, fid_{RUN}", "client_encoding": "LATIN1",
          "options": "-c extra_float_digits=0 -c IntervalStyle=iso_8601 -c statement_timeout=5s"},
         errors=("22P05",), must="D"),
    Case("login-pg-settings-with-startup-params",
         ("SELECT name, setting FROM pg_settings WHERE name NOT LIKE 'plpgsql.%' ORDER BY name",),
         _STARTUPS["saopaulo-sql-iso"], must="D"),
]

_ids = [c.id for c in CASES]
assert len(_ids) == len(set(_ids)), "case ids must be unique"


# ---- running a case ---------------------------------------------------------------------------

@dataclass
class Run:
    login: list[Msg]
    answers: list[list[Msg]]


def run_case(host: str, port: int, case: Case) -> Run:
    conn = PgConn.connect(host, port, case.user, PASSWORDS.get(case.user), case.database or None,
                          params=case.startup)
    with conn:
        answers = []
        for step in case.steps:
            if isinstance(step, str):
                answers.append(conn.simple(step))
            else:
                conn.send(step.data)
                answers.append(conn.read_until_ready(count=step.readies))
        return Run(conn.login_messages, answers)


def login_shape(login: list[Msg]) -> tuple[list[bytes], list[Msg]]:
    """(sorted ParameterStatus bodies, the rest after authentication without BackendKeyData)."""
    last_auth = max(i for i, (code, _) in enumerate(login) if code == codes.B_AUTHENTICATION)
    after = login[last_auth:]  # from AuthenticationOk
    statuses = sorted(body for code, body in after if code == codes.B_PARAMETER_STATUS)
    rest = [m for m in after if m[0] not in (codes.B_PARAMETER_STATUS, codes.B_BACKEND_KEY_DATA)]
    return statuses, rest


# Fields an error of that SQLSTATE must carry in the corpus (position, detail, schema, table,
# constraint, column), so the comparison covers them.
_REQUIRED_FIELDS = {"42601": "P", "42P01": "P", "42703": "PH", "23505": "Dstn", "23502": "Dstc",
                    "P0001": "DHW"}


def check_direct(case: Case, run: Run) -> None:
    """The corpus does what it says: the expected errors and message types come from Postgres."""
    everything = [m for answer in run.answers for m in answer]
    assert sqlstates(everything) == list(case.errors), (
        f"direct run: expected SQLSTATEs {list(case.errors)}, got "
        f"{[render(m) for m in everything if m[0] == codes.B_ERROR_RESPONSE]}")
    for code, body in everything:
        if code == codes.B_ERROR_RESPONSE:
            fields = parse_error_fields(body)
            lacking = [f for f in _REQUIRED_FIELDS.get(fields["C"], "") if f not in fields]
            assert not lacking, f"direct error lacks fields {lacking}: {fields}"
    missing = [ch for ch in case.must if ord(ch) not in {code for code, _ in everything}]
    assert not missing, f"direct run lacks message types {missing}: {types(everything)}"


def assert_same(direct: Run, proxied: Run) -> None:
    want_status, want_rest = login_shape(direct.login)
    got_status, got_rest = login_shape(proxied.login)
    assert got_status == want_status, (
        f"login ParameterStatus differs: only direct {sorted(set(want_status) - set(got_status))}, "
        f"only proxy {sorted(set(got_status) - set(want_status))}")
    assert got_rest == want_rest, f"login: {first_difference(want_rest, got_rest)}"
    assert any(code == codes.B_BACKEND_KEY_DATA for code, _ in proxied.login), "no BackendKeyData from proxy"
    assert len(proxied.answers) == len(direct.answers)
    for n, (want, got) in enumerate(zip(direct.answers, proxied.answers, strict=True)):
        assert got == want, f"step {n}: {first_difference(want, got)}"


class Mismatch(AssertionError):
    """The proxy's bytes differ from Postgres's (what a known-difference xfail expects)."""


@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, raises=Mismatch, reason=c.xfail)]
                 if c.xfail else [])
    for c in CASES])
def test_same_bytes_as_postgres(pg: EmbeddedPostgres, fid_proxy: ProxyHandle, case: Case) -> None:
    direct = run_case("127.0.0.1", pg.port, case)
    check_direct(case, direct)  # a plain AssertionError: fails even a known-difference case
    proxied = run_case(fid_proxy.host, fid_proxy.port, case)
    try:
        assert_same(direct, proxied)
    except AssertionError as exc:
        raise Mismatch(str(exc)) from None


def test_login_status_on_reused_server_connection(pg: EmbeddedPostgres, corpus_db: None,
                                                  proxy_factory: ProxyFactory) -> None:
    """Two logins in a row on a one-connection pool; the second adds a startup parameter, so the
    server connection is re-set while it already has the first login's DateStyle."""
    proxy = proxy_factory("--pool-max-size", "1")
    for startup in ({"DateStyle": "SQL, DMY"}, {"DateStyle": "SQL, DMY", "TimeZone": "UTC"}):
        case = Case("reuse", ("SHOW DateStyle", _TYPE_PROBE), startup, must="D")
        direct = run_case("127.0.0.1", pg.port, case)
        check_direct(case, direct)
        proxied = run_case(proxy.host, proxy.port, case)
        try:
            assert_same(direct, proxied)
        except AssertionError as exc:
            raise AssertionError(f"login with {startup}: {exc}") from None


# ---- refused logins ---------------------------------------------------------------------------

def _fields(body: bytes) -> list[tuple[str, str]]:
    """ErrorResponse fields in order, without the server's source location (F, L, R)."""
    out, pos = [], 0
    while body[pos]:
        end = body.index(b"\x00", pos)
        if chr(body[pos]) not in "FLR":
            out.append((chr(body[pos]), body[pos + 1:end].decode()))
        pos = end + 1
    return out


_PW = PASSWORDS["alice"]


@pytest.mark.parametrize(("user", "password", "database", "startup", "sqlstate"), [
    pytest.param("alice", "wrong", DB, {}, "28P01", id="wrong-password"),
    pytest.param("alice", _PW, "fid_no_such_db", {}, "3D000", id="unknown-database"),
    pytest.param("alice", _PW, DB, {"TimeZone": "Nowhere/Atlantis"}, "22023", id="bad-timezone"),
    pytest.param("alice", _PW, DB, {"DateStyle": "Sideways"}, "22023", id="bad-datestyle"),
    pytest.param("alice", _PW, DB, {"fid_not_a_setting": "1"}, "42704",
                 id="unknown-parameter"),
    pytest.param("alice", _PW, DB, {"options": "-c extra_float_digits=99"}, "22023",
                 id="bad-option-value"),
])
def test_refused_login_same_error(pg: EmbeddedPostgres, fid_proxy: ProxyHandle, user: str, password: str,
                                  database: str, startup: dict[str, str], sqlstate: str) -> None:
    """The same FATAL error, field for field. The file/line/routine fields are left out: for
    settings Postgres would refuse at login the proxy applies them on a pooled server
    connection and words the FATAL error itself, from the fields that matter to a client."""
    errors: list[list[tuple[str, str]]] = []
    for host, port in (("127.0.0.1", pg.port), (fid_proxy.host, fid_proxy.port)):
        with pytest.raises(LoginError) as info:
            PgConn.connect(host, port, user, password, database, params=startup).close()
        assert info.value.fields.get("C") == sqlstate, info.value
        login = info.value.messages
        last_auth = max(i for i, (code, _) in enumerate(login) if code == codes.B_AUTHENTICATION)
        assert types(login[last_auth + 1:]) == "E", types(login)
        errors.append(_fields(info.value.messages[-1][1]))
    direct, proxied = errors
    assert proxied == direct


# ---- a large result -----------------------------------------------------------------------------

CHUNK = 1000  # messages per digest, so a mismatch can be located without keeping the stream


_LARGE_SQL = "SELECT g, repeat(md5(g::text), 4), g * 1.5::float8 FROM generate_series(1, 100000) g"
_LARGE = {
    "simple-text": (query(_LARGE_SQL), "TCZ"),
    "extended-binary": (parse(b"", _LARGE_SQL) + bind(result_formats=(1,)) + describe_portal() + execute()
                        + sync(), "12TCZ"),
}


def _digests(host: str, port: int, request: bytes) -> tuple[list[str], int, str]:
    """(one digest per CHUNK messages, number of DataRows, the other message types)."""
    with PgConn.connect(host, port, USER, PASSWORDS[USER], DB) as conn:
        conn.send(request)
        out, h, data_rows, other = [], hashlib.blake2b(digest_size=16), 0, ""
        for n, (code, body) in enumerate(conn.iter_until_ready(timeout=60), 1):
            h.update(bytes((code,)) + struct.pack("!I", len(body)) + body)
            if code == codes.B_DATA_ROW:
                data_rows += 1
            else:
                other += chr(code)
            if n % CHUNK == 0:
                out.append(h.hexdigest())
                h = hashlib.blake2b(digest_size=16)
        out.append(h.hexdigest())
        return out, data_rows, other


@pytest.mark.parametrize("kind", list(_LARGE))
def test_large_result_same_bytes(pg: EmbeddedPostgres, fid_proxy: ProxyHandle, kind: str) -> None:
    """100k rows (~13 MB of DataRows as text) streamed through and hashed on both sides."""
    request, other = _LARGE[kind]
    direct = _digests("127.0.0.1", pg.port, request)
    assert direct[1:] == (100000, other)
    proxied = _digests(fid_proxy.host, fid_proxy.port, request)
    assert proxied[1:] == direct[1:]
    bad = [i for i, (a, b) in enumerate(zip(direct[0], proxied[0], strict=True)) if a != b]
    assert not bad, f"messages differ in chunks {bad[:10]} (of {CHUNK} messages each)"


def test_compare_catches_a_changed_byte() -> None:
    """The comparison itself: one flipped byte anywhere in a message is a failure."""
    want: list[Msg] = [(codes.B_DATA_ROW, b"\x00\x01\x00\x00\x00\x011"), (codes.B_READY_FOR_QUERY, b"I")]
    got: list[Msg] = [(codes.B_DATA_ROW, b"\x00\x01\x00\x00\x00\x012"), (codes.B_READY_FOR_QUERY, b"I")]
    login: list[Msg] = [(codes.B_AUTHENTICATION, b"\x00\x00\x00\x00"),
                        (codes.B_BACKEND_KEY_DATA, b"\x00" * 8), (codes.B_READY_FOR_QUERY, b"I")]
    run = Run(login, [want])
    with pytest.raises(AssertionError, match="message 0"):
        assert_same(run, Run(run.login, [got]))
    with pytest.raises(AssertionError, match="lengths differ"):
        assert_same(run, Run(run.login, [want[:1]]))
    assert_same(run, Run(run.login, [list(want)]))
    assert rows(want) == [[b"1"]]
