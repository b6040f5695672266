"""Passthrough logins as a client on another host meets them: SCRAM against the secret
auth_query reads for every login (no cleartext), cleartext checked by Postgres itself over
TLS or loopback, a password rotated or a role locked on Postgres refused at once, and the
README's SECURITY DEFINER function for a non-superuser auth_user.

Clients "on another host" run in a network namespace joined by a veth pair (tests/netns.py):
pgsluice sees them at 10.213.x.2, not at 127.0.0.1, as it sees a client through Docker's
published ports.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from proxy.ops.certs import make_server_files
from proxy.ops.embedded import EmbeddedPostgres
from tests.netns import Namespace, namespace
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle

# One login, printed as JSON. With `require_auth`, psycopg (libpq 18) makes the login: libpq
# itself refuses a server that asks for another method, so "SCRAM, not cleartext" is checked by
# the client. Otherwise asyncpg makes it, because it reports the SQLSTATE of a refused login.
CLIENT = r"""
import asyncio, json, sys
from urllib.parse import quote, urlencode
params = json.loads(sys.argv[1])
if "require_auth" in params:
    import psycopg
    try:
        with psycopg.connect(connect_timeout=10, **params) as conn:
            row = conn.execute("SELECT current_user").fetchone()
            print(json.dumps({"ok": True, "user": row[0], "ssl": conn.pgconn.ssl_in_use}))
    except psycopg.Error as exc:
        print(json.dumps({"ok": False, "sqlstate": "client", "message": str(exc)}))
    sys.exit(0)
import asyncpg
async def main():
    p = dict(params)
    auth = quote(p.pop("user"), safe="")
    if "password" in p:
        auth += ":" + quote(p.pop("password"), safe="")
    url = f"postgresql://{auth}@{p.pop('host')}:{p.pop('port')}/{p.pop('dbname')}?" + urlencode(p)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except asyncpg.PostgresError as exc:
        return {"ok": False, "sqlstate": exc.sqlstate, "message": str(exc)}
    try:
        return {"ok": True, "user": await conn.fetchval("SELECT current_user")}
    finally:
        await conn.close()
print(json.dumps(asyncio.run(main())))
"""


def run_client(params: dict[str, str], ns: Namespace | None = None) -> dict[str, object]:
    cmd = [sys.executable, "-c", CLIENT, json.dumps(params)]
    res = ns.run(cmd) if ns is not None else subprocess.run(cmd, capture_output=True, text=True,
                                                              timeout=60, check=False)
    assert res.returncode == 0 and res.stdout.strip(), res.stderr
    out: dict[str, object] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def conninfo(host: str, port: int, user: str, password: str | None, **options: str) -> dict[str, str]:
    params = {"host": host, "port": str(port), "user": user, "dbname": "postgres", "sslmode": "disable"}
    if password is not None:
        params["password"] = password
    params.update(options)
    return params


def login(proxy: ProxyHandle | tuple[str, int], user: str, password: str | None,
          ns: Namespace | None = None, **options: str) -> str:
    """"ok", or the SQLSTATE of the refusal ("client" when libpq refused the method)."""
    host, port = (proxy.host, proxy.port) if isinstance(proxy, ProxyHandle) else proxy
    out = run_client(conninfo(host, port, user, password, **options), ns)
    if out["ok"]:
        assert out["user"] == user
        return "ok"
    return str(out["sqlstate"])


@pytest.fixture
def role(pg: EmbeddedPostgres) -> Iterator[str]:
    """A fresh SCRAM role with password pw1."""
    name = f"rot_{secrets.token_hex(3)}"
    pg.psql(f"SET password_encryption = 'scram-sha-256'; CREATE ROLE {name} LOGIN PASSWORD 'pw1'")
    yield name
    pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{name}'")
    pg.psql(f"DROP ROLE IF EXISTS {name}")


# ---- issue 14 item 4: a password rotated on Postgres stops working through pgsluice at once ----

@pytest.mark.parametrize("auth_query", ["default", "off"])
def test_rotated_password_and_nologin_take_effect_at_once(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                                          role: str, auth_query: str) -> None:
    """Before the fix, a cleartext login compared with the password cached from an earlier
    login: the old password still worked after ALTER ROLE ... PASSWORD, and after NOLOGIN."""
    proxy = proxy_factory(*(("--auth-query", "") if auth_query == "off" else ()))
    method = "scram-sha-256" if auth_query == "default" else "password"
    assert login(proxy, role, "pw1", require_auth=method) == "ok"
    assert login(proxy, role, "pw1", require_auth=method) == "ok"  # the pool now exists
    pg.psql(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'pw2'")
    assert login(proxy, role, "pw1") == "28P01"
    assert login(proxy, role, "pw2", require_auth=method) == "ok"
    pg.psql(f"ALTER ROLE {role} NOLOGIN")
    assert login(proxy, role, "pw2") == "28000"  # Postgres's "not permitted to log in"
    pg.psql(f"ALTER ROLE {role} LOGIN VALID UNTIL '2001-01-01'")
    assert login(proxy, role, "pw2") == "28P01"  # an expired password
    pg.psql(f"ALTER ROLE {role} VALID UNTIL 'infinity'")
    assert login(proxy, role, "pw2", require_auth=method) == "ok"


def test_trusted_role_made_nologin_is_refused_at_once(pg: EmbeddedPostgres, proxy: ProxyHandle) -> None:
    """pg_hba trusts trusted_user; before the fix, once a login had found that out, pgsluice let
    the role in without asking Postgres again, even after NOLOGIN."""
    assert login(proxy, "trusted_user", None, require_auth="none") == "ok"
    pg.psql("ALTER ROLE trusted_user NOLOGIN")
    try:
        assert login(proxy, "trusted_user", None) == "28000"
    finally:
        pg.psql("ALTER ROLE trusted_user LOGIN")
    assert login(proxy, "trusted_user", None, require_auth="none") == "ok"


def test_wrong_password_and_unknown_user(proxy: ProxyHandle) -> None:
    assert login(proxy, "alice", "wrong") == "28P01"
    out = run_client(conninfo(proxy.host, proxy.port, "alice", "x", require_auth="scram-sha-256"))
    assert 'password authentication failed for user "alice"' in str(out["message"]), out
    assert login(proxy, "no_such_user", "x") == "28P01"  # loopback: Postgres checked it


def test_each_kind_of_role_as_postgres_asks(proxy: ProxyHandle) -> None:
    """SCRAM roles get SCRAM, the md5 role (md5 in pg_hba) md5, the trusted role nothing."""
    assert login(proxy, "alice", PASSWORDS["alice"], require_auth="scram-sha-256") == "ok"
    assert login(proxy, "md5_user", PASSWORDS["md5_user"], require_auth="md5") == "ok"
    assert login(proxy, "md5_user", "wrong") == "28P01"
    assert login(proxy, "trusted_user", None, require_auth="none") == "ok"


# ---- from another host ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ns() -> Iterator[Namespace]:
    with namespace() as created:
        yield created


def test_scram_from_another_host(pg: EmbeddedPostgres, proxy_factory: ProxyFactory, ns: Namespace,
                                 role: str) -> None:
    proxy = proxy_factory(listen_host=ns.host_ip)
    there = (ns.host_ip, proxy.port)
    assert login(there, role, "pw1", ns, require_auth="scram-sha-256") == "ok"
    assert f"peer={ns.ns_ip}:" in proxy.log_text()  # really not loopback
    assert login(there, role, "nope", ns) == "28P01"
    pg.psql(f"SET password_encryption = 'scram-sha-256'; ALTER ROLE {role} PASSWORD 'pw2'")
    assert login(there, role, "pw1", ns) == "28P01"
    assert login(there, role, "pw2", ns, require_auth="scram-sha-256") == "ok"
    assert login(there, "md5_user", PASSWORDS["md5_user"], ns, require_auth="md5") == "ok"
    pg.psql(f"ALTER ROLE {role} NOLOGIN")
    for user in (role, "no_such_user"):  # no secret, no TLS: a SCRAM exchange that fails
        assert login(there, user, "pw2", ns) == "28P01"
        out = run_client(conninfo(*there, user, "pw2", require_auth="scram-sha-256"), ns)
        assert f'password authentication failed for user "{user}"' in str(out["message"]), out


def test_cleartext_from_another_host_needs_tls(proxy_factory: ProxyFactory, ns: Namespace,
                                               tmp_path: Path) -> None:
    files = make_server_files(tmp_path, [ns.host_ip])
    proxy = proxy_factory("--auth-query", "", "--tls-cert", str(files["cert"]), "--tls-key",
                          str(files["key"]), listen_host=ns.host_ip)
    there = (ns.host_ip, proxy.port)
    out = run_client(conninfo(*there, "alice", PASSWORDS["alice"]), ns)
    assert out["sqlstate"] == "28000" and "needs TLS" in str(out["message"]), out
    assert login(there, "alice", PASSWORDS["alice"], ns, sslmode="verify-full", sslrootcert=str(files["ca"]),
                 require_auth="password") == "ok"
    assert login(there, "alice", "wrong", ns, sslmode="require") == "28P01"


# ---- a non-superuser auth_user, with the README's function ---------------------------------

AUTH_FUNCTION = """
CREATE ROLE pgsluice_auth LOGIN PASSWORD 'auth-pw';
CREATE SCHEMA pgsluice_auth AUTHORIZATION pgsluice_auth;
CREATE FUNCTION pgsluice_auth.lookup(p_user name, OUT username name, OUT secret text)
RETURNS record LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog AS $$
    SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
    FROM pg_authid WHERE rolname = p_user AND rolcanlogin AND NOT rolsuper
$$;
REVOKE ALL ON FUNCTION pgsluice_auth.lookup(name) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgsluice_auth.lookup(name) TO pgsluice_auth;
"""


@pytest.fixture
def auth_function(pg: EmbeddedPostgres) -> Iterator[None]:
    pg.psql(AUTH_FUNCTION)
    yield
    pg.psql("DROP SCHEMA pgsluice_auth CASCADE; DROP ROLE pgsluice_auth;")


def test_security_definer_auth_query(proxy_factory: ProxyFactory, auth_function: None, ns: Namespace,
                                     tmp_path: Path) -> None:
    """Superusers are left out by the function: over loopback or TLS they still log in with a
    cleartext password that Postgres checks; from another host in the clear they cannot."""
    files = make_server_files(tmp_path, [ns.host_ip])
    proxy = proxy_factory("--auth-user", "pgsluice_auth", "--auth-password", "auth-pw",
                          "--auth-query", "SELECT username, secret FROM pgsluice_auth.lookup($1)",
                          "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"]),
                          listen_host=ns.host_ip)
    there = (ns.host_ip, proxy.port)
    assert login(there, "alice", PASSWORDS["alice"], ns, require_auth="scram-sha-256") == "ok"
    assert login(there, "alice", "wrong", ns) == "28P01"
    assert login(there, "postgres", "postgres", ns) == "28P01"
    assert login(there, "postgres", "postgres", ns, sslmode="require", require_auth="password") == "ok"
    assert login(there, "postgres", "wrong", ns, sslmode="require") == "28P01"
    assert "auth_query failed" not in proxy.log_text()


def test_auth_query_that_fails_falls_back_to_postgres(proxy_factory: ProxyFactory) -> None:
    proxy = proxy_factory("--auth-query", "SELECT no_such_column FROM pg_authid WHERE rolname = $1")
    assert login(proxy, "alice", PASSWORDS["alice"], require_auth="password") == "ok"
    assert login(proxy, "alice", "wrong") == "28P01"
    assert "auth_query failed" in proxy.log_text()
