"""The ParameterStatus a client gets at login is what its own settings give, whatever the
previous client left on the (one) server connection: the same set Postgres itself sends."""

from __future__ import annotations

import codecs
import os
import random
import subprocess

import psycopg
import pytest

from proxy.ops.embedded import EmbeddedPostgres
from tests.rawpg import PgConn
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

USER, DB = "alice", "app"
SETTINGS = [
    {"client_encoding": "EUC_JP"},
    {"client_encoding": "EUC_JP", "application_name": "other"},
    {"client_encoding": "LATIN1", "DateStyle": "SQL, DMY"},
    {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Tokyo"},
    {"DateStyle": "German", "IntervalStyle": "iso_8601"},
    {"TimeZone": "Asia/Tokyo", "application_name": "tz"},
    {"options": "-c DateStyle=Postgres,YMD -c IntervalStyle=sql_standard"},
    {"standard_conforming_strings": "off", "client_encoding": "EUC_JP"},
    {"default_transaction_read_only": "on"},
    {},
]


@pytest.fixture
def one_backend(proxy_factory: ProxyFactory) -> ProxyHandle:
    return proxy_factory("--pool-max-size", "1")


def login_status(host: str, port: int, params: dict[str, str]) -> dict[str, str]:
    conn = PgConn.connect(host, port, USER, PASSWORDS[USER], DB, params=params)
    conn.close()
    return dict(conn.parameters)


def test_every_login_reports_its_own_settings(pg: EmbeddedPostgres, one_backend: ProxyHandle) -> None:
    """Logins with varied settings, in a shuffled order with repeats, on one server
    connection: each gets exactly the ParameterStatus set Postgres sends for those settings."""
    direct = {i: login_status("127.0.0.1", pg.port, s) for i, s in enumerate(SETTINGS)}
    # in list order first: neighbours share a value, which the server connection then already has
    shuffled = list(range(len(SETTINGS))) * 2
    random.Random(14).shuffle(shuffled)
    for i in list(range(len(SETTINGS))) + shuffled:
        got = login_status(one_backend.host, one_backend.port, SETTINGS[i])
        diff = sorted(set(got.items()) ^ set(direct[i].items()))
        assert got == direct[i], f"login with {SETTINGS[i]}: {diff}"


def test_psql_encoding_from_environment(one_backend: ProxyHandle) -> None:
    """PGCLIENTENCODING=eucjp psql: \\encoding (what the login reported) says EUC_JP every time,
    also after a login that left EUC_JP on the server connection with other settings."""
    for app in ("a", "b", "c"):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(PGCLIENTENCODING="eucjp", PGAPPNAME=app)
        out = subprocess.run(["psql", "-X", "-At", "-c", "\\encoding", "-c", "SHOW client_encoding",
                              one_backend.dsn(USER, PASSWORDS[USER], DB)],
                             env=env, capture_output=True, text=True, timeout=30, check=True).stdout
        assert out.split() == ["EUC_JP", "EUC_JP"], f"application_name {app}: {out!r}"


@pytest.mark.parametrize("encoding", ["euc-jp", "latin1"])
def test_psycopg_encoding(one_backend: ProxyHandle, encoding: str) -> None:
    """psycopg's test_encoding_env_var: the connection's encoding is the one it asked for."""
    for app in ("x", "y"):
        with psycopg.connect(one_backend.dsn(USER, PASSWORDS[USER], DB), client_encoding=encoding,
                             application_name=app) as conn:
            assert codecs.lookup(conn.info.encoding).name == codecs.lookup(encoding).name
            row = conn.execute("SHOW client_encoding").fetchone()
            assert row is not None and codecs.lookup(row[0]).name == codecs.lookup(encoding).name
