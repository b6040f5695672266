"""Byte fidelity: what a client receives through pgsluice is what it receives from Postgres.

Each case runs the same messages on a raw connection straight to Postgres and on one
through the proxy (same user, database and startup parameters) and compares every
message after login byte for byte. Login is compared as the set of ParameterStatus
values (BackendKeyData differs by design).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

import pytest

from proxy.embedded import EmbeddedPostgres
from proxy.pgwire import codes, encode
from tests.rawpg import Msg, Raw, describe
from tests.util import ProxyFactory, ProxyHandle

USER, DB = "trusted_user", "postgres"  # trusted by Postgres: no password on either path
T = "fid_things"  # the corpus table, created once

_SETUP = f"""
DROP TABLE IF EXISTS {T}; DROP TYPE IF EXISTS fid_mood; DROP TYPE IF EXISTS fid_pair;
CREATE TYPE fid_mood AS ENUM ('sad', 'ok', 'happy');
CREATE TYPE fid_pair AS (a int, b text);
CREATE TABLE {T} (id int PRIMARY KEY, mood fid_mood, pair fid_pair, tags text[], doc jsonb);
INSERT INTO {T} VALUES
  (1, 'ok', ROW(1, 'x'), ARRAY['a', 'b "q"', NULL], '{{"k": [1, 2.5, null]}}'),
  (2, NULL, NULL, '{{}}', 'null');
GRANT ALL ON {T} TO trusted_user;
"""


@pytest.fixture(scope="module")
def corpus_db(pg: EmbeddedPostgres) -> Iterator[None]:
    pg.psql(_SETUP)
    yield
    pg.psql(f"DROP TABLE {T}; DROP TYPE fid_mood; DROP TYPE fid_pair;")


@pytest.fixture(scope="module")
def fid_proxy(corpus_db: None, proxy_factory_module: ProxyFactory) -> ProxyHandle:
    return proxy_factory_module("--pool-max-size", "2")


# ---- extended-protocol encoders (the proxy's own encode module has only what it sends) -----

def bind(portal: bytes, stmt: bytes, params: list[bytes | None], result_formats: list[int]) -> bytes:
    body = portal + b"\x00" + stmt + b"\x00" + struct.pack("!hh", 1, 0) + struct.pack("!h", len(params))
    for p in params:
        body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
    body += struct.pack("!h", len(result_formats)) + b"".join(struct.pack("!h", f) for f in result_formats)
    return encode.message(codes.F_BIND, body)


def describe_msg(kind: bytes, name: bytes) -> bytes:
    return encode.message(codes.F_DESCRIBE, kind + name + b"\x00")


def execute(portal: bytes, limit: int = 0) -> bytes:
    return encode.message(codes.F_EXECUTE, portal + b"\x00" + struct.pack("!i", limit))


SYNC = encode.sync()

# ---- the corpus ------------------------------------------------------------------------------
# A case is a list of steps run on one connection: a str is a simple Query, bytes are sent
# as they are and read up to ReadyForQuery.
Step = str | bytes

_TYPES = (
    "SELECT 1::int2, -32768::int2, 2147483647::int4, -2147483648::int4, 9223372036854775807::int8",
    "SELECT 3.14159::numeric(10,4), 'NaN'::numeric, 1e40::numeric, -0.000001::numeric, 12345678901234567890",
    "SELECT 0.1::float8, 1e-310::float8, 'Infinity'::float8, '-Infinity'::float4, 'NaN'::float8,"
    " -0.0::float8, 3.4028235e38::float4",
    "SELECT 'plain', '', 'üñíçødé ✓ 日本', E'tab\\there\\nline', 'quote''s'",
    "SELECT '\\x00ff10'::bytea, 'abc\\\\def'::bytea, ''::bytea",
    "SELECT true, false, NULL::bool",
    "SELECT '2024-02-29'::date, 'infinity'::date, '4713-01-01 BC'::date, '12:34:56.789'::time,"
    " '23:59:59+05:30'::timetz",
    "SELECT '2024-03-10 02:30:00'::timestamp, '2024-06-01 12:00:00+00'::timestamptz,"
    " '1999-12-31 23:59:59.999999-08'::timestamptz, 'epoch'::timestamptz",
    "SELECT '1 year 2 mons 3 days 04:05:06.7'::interval, '-1 day'::interval, '0'::interval",
    "SELECT 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, '{\"b\": 1, \"a\": [true, null]}'::json,"
    " '{\"b\": 1, \"a\": [true, null]}'::jsonb",
    "SELECT ARRAY[1, 2, NULL], ARRAY[[1, 2], [3, 4]], ARRAY['x y', 'q\"t', NULL, ''], '{}'::int[]",
    "SELECT NULL, NULL::text, NULL::int[]",
    f"SELECT * FROM {T} ORDER BY id",
    f"SELECT pair, (pair).b, mood, mood < 'happy' FROM {T} ORDER BY id",
    "SELECT ROW(1, 'two', NULL, ARRAY[3])",
    f"COPY (SELECT * FROM {T} ORDER BY id) TO STDOUT WITH (FORMAT csv, HEADER)",
    f"COPY {T} TO STDOUT WITH (FORMAT binary)",
)

_SETTINGS = (
    ["SET extra_float_digits = 0", "SELECT 0.1::float8, 1/3::float4", "SET extra_float_digits = 3",
     "SELECT 0.1::float8, 1/3::float4"],
    ["SET bytea_output = 'escape'", "SELECT '\\x00ff10'::bytea", "SET bytea_output = 'hex'",
     "SELECT '\\x00ff10'::bytea"],
    ["SET IntervalStyle = 'iso_8601'", "SELECT '1 year 2 mons 3 days 04:05:06.7'::interval",
     "SET IntervalStyle = 'sql_standard'", "SELECT '-1 year 2 days'::interval"],
    ["SET DateStyle = 'German, DMY'", "SELECT '2024-02-29 10:00'::timestamp, '2024-02-29'::date",
     "SET DateStyle = 'SQL, MDY'", "SELECT '2024-02-29 10:00+01'::timestamptz"],
    ["SET TimeZone = 'America/Sao_Paulo'", "SELECT '2024-06-01 12:00:00+00'::timestamptz",
     "SET TimeZone = 'Asia/Kolkata'", "SELECT '2024-06-01 12:00:00+00'::timestamptz"],
)

_ERRORS = (
    ["SELECT 1/0"],
    ["SELEC 1"],
    ["SELECT * FROM fid_no_such_table"],
    [f"INSERT INTO {T} (id) VALUES (1)"],  # 23505 with detail, schema, table, constraint
    ["SELECT 1; SELECT 1/0; SELECT 3"],
    ["BEGIN", "SELECT 1/0", "SELECT 1", "ROLLBACK", "SELECT 'after'"],
    ["BEGIN", "SAVEPOINT s", "SELECT 1/0", "ROLLBACK TO s", "SELECT 2", "COMMIT"],
    [""],
    [";"],
    ["DO $$BEGIN RAISE NOTICE 'hello % %', 1, 'two'; RAISE WARNING 'careful'; END$$"],
    ["SELECT 1 AS a; SELECT 'b' AS b, 2; SHOW DateStyle"],
    ["DO $$BEGIN RAISE EXCEPTION USING ERRCODE = 'P0001', MESSAGE = 'custom', DETAIL = 'd', HINT = 'h';"
     " END$$"],
)

_EXTENDED = (
    # unnamed statement, text params, text results
    [encode.parse(b"", b"SELECT $1::int + 1, $2::text", b"\x00\x00") + bind(b"", b"", [b"41", None], [0])
     + describe_msg(b"P", b"") + execute(b"") + SYNC],
    # binary results of every common type
    [encode.parse(b"", (b"SELECT 1::int2, 2::int4, 3::int8, 1.5::float8, 2.5::float4, 'x'::text, true,"
                        b" '2024-01-01'::date, '2024-01-01 10:00+00'::timestamptz, '\\x01'::bytea,"
                        b" 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'::uuid, 12.34::numeric, ARRAY[1,2],"
                        b" '{\"a\":1}'::jsonb, '1 day'::interval"))
     + bind(b"", b"", [], [1]) + describe_msg(b"P", b"") + execute(b"") + SYNC],
    # named statement: describe statement (ParameterDescription + RowDescription), two binds
    [encode.parse(b"fid_s1", f"SELECT id, mood, tags FROM {T} WHERE id >= $1 ORDER BY id".encode(),
                  b"\x00\x01\x00\x00\x00\x17") + describe_msg(b"S", b"fid_s1") + SYNC,
     bind(b"", b"fid_s1", [b"1"], [0]) + execute(b"") + bind(b"", b"fid_s1", [b"2"], [1]) + execute(b"")
     + SYNC,
     encode.close_statement(b"fid_s1") + SYNC],
    # portal with a row limit: PortalSuspended, then the rest
    [encode.parse(b"", b"SELECT g FROM generate_series(1, 5) g") + bind(b"p1", b"", [], [0])
     + execute(b"p1", 2) + execute(b"p1", 2) + execute(b"p1", 0) + SYNC],
    # errors: at Parse, at Bind, at Execute; the rest of the batch is skipped until Sync
    [encode.parse(b"", b"SELEC 1") + bind(b"", b"", [], [0]) + execute(b"") + SYNC,
     encode.parse(b"", b"SELECT $1::int") + bind(b"", b"", [b"nope"], [0]) + execute(b"") + SYNC,
     encode.parse(b"", b"SELECT 1/0") + bind(b"", b"", [], [0]) + execute(b"") + SYNC],
    # empty query and a statement without rows through the extended protocol
    [encode.parse(b"", b"") + bind(b"", b"", [], []) + describe_msg(b"P", b"") + execute(b"") + SYNC,
     encode.parse(b"", b"SET LOCAL work_mem = '8MB'") + bind(b"", b"", [], []) + describe_msg(b"P", b"")
     + execute(b"") + SYNC],
    # transaction status across batches, and an error inside a transaction block
    ["BEGIN", encode.parse(b"", b"SELECT 1/0") + bind(b"", b"", [], []) + execute(b"") + SYNC,
     encode.parse(b"", b"SELECT 1") + bind(b"", b"", [], []) + execute(b"") + SYNC, "ROLLBACK"],
)

CASES: list[tuple[str, dict[str, str], list[Step]]] = []
for i, sql in enumerate(_TYPES):
    CASES.append((f"types{i}", {}, [sql]))
    CASES.append((f"types{i}-kolkata-german", {"TimeZone": "Asia/Kolkata", "DateStyle": "German, DMY"},
                  [sql]))
for i, steps in enumerate(_SETTINGS):
    CASES.append((f"settings{i}", {}, list(steps)))
for i, steps in enumerate(_ERRORS):
    CASES.append((f"errors{i}", {}, list(steps)))
    CASES.append((f"errors{i}-verbose", {"application_name": "fid", "search_path": "public"}, list(steps)))
for i, steps in enumerate(_EXTENDED):
    CASES.append((f"extended{i}", {}, list(steps)))
CASES.append(("startup-options", {"options": "-c extra_float_digits=0 -c IntervalStyle=iso_8601",
                                  "client_encoding": "LATIN1"},
              ["SELECT 0.1::float8, '1 day 2 hours'::interval, 'caf\u00e9'"]))


async def _session(target: ProxyHandle | tuple[str, int], params: dict[str, str],
                   steps: list[Step]) -> tuple[dict[str, str], list[list[Msg]]]:
    raw = await Raw.open(target)
    try:
        login = await raw.startup(encode.startup_message({"user": USER, "database": DB, **params}),
                                  user=USER)
        status = {}
        for code, body in login:
            if code == codes.B_PARAMETER_STATUS:
                name, value, _ = body.split(b"\x00")
                status[name.decode()] = value.decode()
        answers = []
        for step in steps:
            await raw.send(encode.query(step) if isinstance(step, str) else step)
            answers.append(await raw.read_until_ready(timeout=10))
        return status, answers
    finally:
        await raw.close()


@pytest.mark.parametrize(("params", "steps"), [(p, s) for _, p, s in CASES], ids=[c[0] for c in CASES])
async def test_same_bytes_as_postgres(pg: EmbeddedPostgres, fid_proxy: ProxyHandle,
                                      params: dict[str, str], steps: list[Step]) -> None:
    direct_status, direct = await _session(("127.0.0.1", pg.port), params, steps)
    proxied_status, proxied = await _session(fid_proxy, params, steps)
    for n, (want, got) in enumerate(zip(direct, proxied, strict=True)):
        assert got == want, f"step {n}: direct {describe(want)} vs proxy {describe(got)}"
    # the proxy may report more (e.g. parameters Postgres reports), never different values
    for name, value in direct_status.items():
        assert proxied_status.get(name) == value, name


async def test_large_result_same_bytes(pg: EmbeddedPostgres, fid_proxy: ProxyHandle) -> None:
    """100k rows, ~13 MB: streamed through in pieces, hashed on both sides."""
    sql = "SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, 100000) g"

    async def digest(target: ProxyHandle | tuple[str, int]) -> tuple[str, int]:
        raw = await Raw.open(target)
        try:
            await raw.startup(encode.startup_message({"user": USER, "database": DB}), user=USER)
            await raw.send(encode.query(sql))
            h, rows = hashlib.blake2b(), 0
            while True:
                msg = await raw.read_message(timeout=30)
                assert msg is not None
                h.update(bytes([msg[0]]) + msg[1])
                rows += msg[0] == codes.B_DATA_ROW
                if msg[0] == codes.B_READY_FOR_QUERY:
                    return h.hexdigest(), rows
        finally:
            await raw.close()

    direct = await digest(("127.0.0.1", pg.port))
    assert direct[1] == 100000
    assert await digest(fid_proxy) == direct
