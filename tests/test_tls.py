"""TLS on every door and towards Postgres, with real clients: psql (libpq 15), psycopg 3
(libpq 18: direct negotiation, channel binding), asyncpg and pgJDBC with sslmode=require and
verify-full; client certificates; Postgres's own refusal of a plain client under require;
SCRAM-SHA-256-PLUS offered exactly when it can be honoured; a Postgres with ssl = on whose
pg_hba.conf admits TLS only; the gRPC door and /metrics over TLS.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import ssl
import subprocess
import threading
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import psycopg
import pytest

from cache.feed import INSTALL
from proxy.client import SluiceClient, SluiceError
from proxy.ops.certs import Authority
from proxy.ops.embedded import EmbeddedPostgres, free_port
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import parse_auth, parse_error_fields
from tests.conftest import make_traversable_tmpdir
from tests.tlspg import tls_postgres
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, port_open, wait_until

PW = PASSWORDS["alice"]
SYSTEM_PSQL = "/usr/bin/psql"  # Debian's, built with OpenSSL (the embedded one is not)
JDBC_JAR = "/usr/share/java/postgresql.jar"


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Authority
    ca_file: Path
    cert: Path
    key: Path
    alice_cert: Path  # a client certificate our CA signed
    alice_key: Path
    stranger_cert: Path  # one signed by another CA
    stranger_key: Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    folder.chmod(0o755)
    ca = Authority("pgsluice test CA")
    ca_file = folder / "ca.crt"
    ca_file.write_bytes(ca.pem)
    cert, key = ca.issue("pgsluice", ["localhost", "127.0.0.1"]).write(folder, "server")
    alice = ca.issue("alice", client=True).write(folder, "alice")
    stranger = Authority("someone else's CA").issue("alice", client=True).write(folder, "stranger")
    return Pki(folder, ca, ca_file, cert, key, *alice, *stranger)


def tls_args(pki: Pki, *extra: str) -> tuple[str, ...]:
    return ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), *extra)


@pytest.fixture(scope="module")
def door(proxy_factory_module: ProxyFactory, pki: Pki) -> ProxyHandle:
    """tls_mode = allow (the default once a certificate is set)."""
    return proxy_factory_module(*tls_args(pki))


def client_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C", PGPASSFILE=os.devnull, PGCONNECT_TIMEOUT="10")
    return env


def psql(conninfo: str, sql: str = "SELECT current_user") -> subprocess.CompletedProcess[str]:
    return subprocess.run([SYSTEM_PSQL, "-X", "-At", conninfo, "-c", "\\conninfo", "-c", sql],
                          env=client_env(), capture_output=True, text=True, timeout=60, check=False)


def kv(port: int, host: str = "127.0.0.1", user: str = "alice", password: str = PW, **options: str) -> str:
    return " ".join([f"host={host} port={port} user={user} password={password} dbname=postgres",
                     *(f"{k}={v}" for k, v in options.items())])


# ---- clients -------------------------------------------------------------------------------------

def test_psql_require_and_verify_full(door: ProxyHandle, pki: Pki) -> None:
    for options in ({"sslmode": "require"},
                    {"sslmode": "verify-full", "sslrootcert": str(pki.ca_file), "host": "localhost"}):
        res = psql(kv(door.port, **options))
        assert res.returncode == 0, res.stderr
        assert "SSL connection (protocol: TLSv1.3" in res.stdout and res.stdout.endswith("alice\n")
    other = pki.dir / "other-ca.crt"
    other.write_bytes(Authority("not ours").pem)
    res = psql(kv(door.port, sslmode="verify-ca", sslrootcert=str(other)))
    assert res.returncode != 0 and "certificate verify failed" in res.stderr


async def test_asyncpg_require_verify_full_and_direct(door: ProxyHandle, pki: Pki) -> None:
    verify = ssl.create_default_context(cafile=str(pki.ca_file))
    verify.set_alpn_protocols(["postgresql"])  # asyncpg sets it only on contexts it makes
    for host, tls, direct in (("127.0.0.1", "require", False), ("localhost", verify, False),
                              ("127.0.0.1", "require", True), ("localhost", verify, True)):
        conn = await asyncpg.connect(host=host, port=door.port, user="alice", password=PW,
                                     database="postgres", ssl=tls, direct_tls=direct)
        try:
            assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
            assert conn._transport.get_extra_info("ssl_object") is not None  # type: ignore[attr-defined]
        finally:
            await conn.close()


def test_psycopg_require_verify_full_direct_and_channel_binding(door: ProxyHandle, pki: Pki) -> None:
    full = {"sslmode": "verify-full", "sslrootcert": str(pki.ca_file), "host": "localhost"}
    for options in ({"sslmode": "require"}, full, {**full, "sslnegotiation": "direct"},
                    {**full, "channel_binding": "require"},
                    {**full, "sslnegotiation": "direct", "channel_binding": "require"}):
        with psycopg.connect(kv(door.port, **options)) as conn:
            assert conn.pgconn.ssl_in_use
            assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
    with pytest.raises(psycopg.OperationalError, match="channel binding"):  # libpq's own check
        psycopg.connect(kv(door.port, sslmode="disable", channel_binding="require")).close()
    with psycopg.connect(kv(door.port, sslmode="require")) as conn:  # libpq 18 cancels over TLS too
        timer = threading.Timer(0.5, conn.cancel_safe)
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join()


def jdbc(url: str, user: str = "alice", password: str = PW) -> str:
    java = shutil.which("java")
    if java is None or not Path(JDBC_JAR).exists():
        pytest.fail("java and pgJDBC are needed (scripts/test installs default-jdk-headless and "
                    "libpostgresql-jdbc-java)")
    probe = Path(__file__).parent / "java" / "JdbcProbe.java"
    res = subprocess.run([java, "-cp", JDBC_JAR, str(probe), url, user, password],
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_jdbc_require_and_verify_full(door: ProxyHandle, pki: Pki) -> None:
    assert jdbc(f"jdbc:postgresql://127.0.0.1:{door.port}/postgres?sslmode=require") == "ok alice 42"
    url = f"jdbc:postgresql://localhost:{door.port}/postgres?sslmode=verify-full&sslrootcert={pki.ca_file}"
    assert jdbc(url) == "ok alice 42"
    assert jdbc(url, password="wrong").startswith("error 28P01")


# ---- the door's policy ----------------------------------------------------------------------------

def test_client_certificates_with_tls_ca(proxy_factory: ProxyFactory, pki: Pki) -> None:
    proxy = proxy_factory(*tls_args(pki, "--tls-ca", str(pki.ca_file), "--tls-mode", "require"))
    ok = psql(kv(proxy.port, sslmode="require", sslcert=str(pki.alice_cert), sslkey=str(pki.alice_key)))
    assert ok.returncode == 0 and ok.stdout.endswith("alice\n"), ok.stderr
    without = psql(kv(proxy.port, sslmode="require", sslcert="/nonexistent", sslkey="/nonexistent"))
    assert without.returncode != 0 and "certificate required" in without.stderr, without.stderr
    foreign = psql(kv(proxy.port, sslmode="require", sslcert=str(pki.stranger_cert),
                      sslkey=str(pki.stranger_key)))
    assert foreign.returncode != 0 and "unknown ca" in foreign.stderr, foreign.stderr
    plain = psql(kv(proxy.port, sslmode="disable"))
    assert plain.returncode != 0 and "no encryption" in plain.stderr
    assert psql(kv(proxy.port, sslmode="require", sslcert=str(pki.alice_cert),
                   sslkey=str(pki.alice_key))).returncode == 0  # the refusals disturbed nothing


@pytest.fixture(scope="module")
def tls_pg(pki: Pki) -> Iterator[EmbeddedPostgres]:
    base = make_traversable_tmpdir("pgsluice-tlspg-")  # Postgres runs as another OS user
    try:
        with tls_postgres(base, pki.ca) as server:
            server.psql(INSTALL)  # the change feed: pgsluice keeps a LISTEN connection open
            yield server
    finally:
        shutil.rmtree(base, ignore_errors=True)


async def _refusal(host: str, port: int) -> tuple[str, str]:
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(host=host, port=port, user="alice", password=PW, database="postgres",
                              ssl=False)
    return info.value.sqlstate, str(info.value)


async def test_require_refuses_plain_clients_with_postgres_message(
        proxy_factory: ProxyFactory, tls_pg: EmbeddedPostgres, pki: Pki) -> None:
    proxy = proxy_factory(*tls_args(pki, "--tls-mode", "require"))
    direct = await _refusal("127.0.0.1", tls_pg.port)
    assert direct[0] == "28000" and "no encryption" in direct[1]
    assert await _refusal("127.0.0.1", proxy.port) == direct
    res = psql(kv(proxy.port, sslmode="require"))
    assert res.returncode == 0, res.stderr


# ---- SCRAM-SHA-256-PLUS ---------------------------------------------------------------------------

def _mechanisms(port: int, tls: bool, user: str = "alice") -> list[bytes]:
    """The SASL mechanisms pgsluice offers this user, over TLS or not."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        sock: socket.socket = raw
        if tls:
            raw.sendall(encode.ssl_request())
            assert raw.recv(1) == b"S"
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            sock = ctx.wrap_socket(raw, server_hostname="localhost")
        sock.sendall(encode.startup_message({"user": user, "database": "postgres"}))
        data = b""
        while len(data) < 5 or len(data) < int.from_bytes(data[1:5], "big") + 1:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data[0] == codes.B_AUTHENTICATION, data
        kind, extra = parse_auth(data[5:int.from_bytes(data[1:5], "big") + 1])
        assert kind == codes.AUTH_SASL
        return [m for m in extra.split(b"\x00") if m]


@pytest.mark.parametrize("digest", ["sha384", "ed25519"])
def test_channel_binding_offered_only_when_it_can_be_honoured(door: ProxyHandle, proxy_factory: ProxyFactory,
                                                              pki: Pki, digest: str) -> None:
    assert _mechanisms(door.port, tls=False) == [b"SCRAM-SHA-256"]
    assert _mechanisms(door.port, tls=True) == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
    # The binding hash follows the certificate's signature: SHA-384 here. Ed25519 has none to
    # follow (RFC 5929 leaves it undefined), so -PLUS is not offered and libpq must refuse.
    other = Authority(f"{digest} CA", digest=digest)
    cert, key = other.issue("pgsluice", ["localhost"]).write(pki.dir, f"server-{digest}")
    ca_file = pki.dir / f"ca-{digest}.crt"
    ca_file.write_bytes(other.pem)
    proxy = proxy_factory("--tls-cert", str(cert), "--tls-key", str(key))
    options = {"host": "localhost", "sslmode": "verify-full", "sslrootcert": str(ca_file),
               "channel_binding": "require"}
    if digest == "sha384":
        assert _mechanisms(proxy.port, tls=True) == [b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256"]
        with psycopg.connect(kv(proxy.port, **options)) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    else:
        assert _mechanisms(proxy.port, tls=True) == [b"SCRAM-SHA-256"]
        with pytest.raises(psycopg.OperationalError, match="channel binding"):
            psycopg.connect(kv(proxy.port, **options)).close()
        with psycopg.connect(kv(proxy.port, **{**options, "channel_binding": "prefer"})) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


# ---- raw edges of the negotiation ----------------------------------------------------------------

def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_unencrypted_bytes_after_sslrequest_are_refused(door: ProxyHandle) -> None:
    """CVE-2021-23214: bytes sent with the SSLRequest would be read as if encrypted."""
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as sock:
        sock.sendall(encode.ssl_request() + encode.startup_message({"user": "alice"}))
        data = _read_all(sock)
    assert data[:1] == b"E", data
    fields = parse_error_fields(data[5:])
    assert (fields["C"], fields["M"]) == ("08P01", "received unencrypted data after SSL request")


def test_direct_tls_needs_alpn_and_a_certificate(door: ProxyHandle, proxy: ProxyHandle) -> None:
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # no ALPN set
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as sock:
        data = _read_all(sock)
    fields = parse_error_fields(data[5:])
    assert fields["C"] == "08P01" and "without ALPN" in fields["M"], data
    ctx.set_alpn_protocols(["postgresql"])
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw, \
            pytest.raises((ssl.SSLError, ConnectionError)):
        ctx.wrap_socket(raw, server_hostname="localhost")  # no certificate there: closed
    with socket.create_connection(("127.0.0.1", door.port), timeout=10) as raw:  # not TLS at all
        raw.sendall(encode.ssl_request())
        assert raw.recv(1) == b"S"
        raw.sendall(b"\x16\x03\x01\x00\x05hello, not a ClientHello")
        assert _read_all(raw)[:1] == b"\x15"  # a TLS alert, then the connection closes
    res = psql(kv(door.port, sslmode="require"))
    assert res.returncode == 0, res.stderr  # nobody else was disturbed


# ---- towards Postgres -----------------------------------------------------------------------------

def _ssl_of_pgsluice(tls_pg: EmbeddedPostgres) -> set[tuple[str, str]]:
    rows = tls_pg.psql("SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s "
                       "USING (pid) WHERE a.client_port IS NOT NULL AND a.pid <> pg_backend_pid()")
    return {(name, used) for name, used in (line.split("|") for line in rows.splitlines() if line)}


@pytest.mark.parametrize("mode", ["prefer", "require", "verify-full"])
def test_server_tls_to_a_postgres_that_requires_it(proxy_factory: ProxyFactory, tls_pg: EmbeddedPostgres,
                                                   pki: Pki, mode: str) -> None:
    proxy = proxy_factory("--upstream", tls_pg.dsn(), "--server-tls-mode", mode,
                          "--server-tls-ca", str(pki.ca_file))
    with psycopg.connect(kv(proxy.port, sslmode="disable", application_name="tls-upstream")) as conn:
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        # the auth query, catalog and change-feed connections (asyncpg) use TLS as well
        seen = wait_until(lambda: (s := _ssl_of_pgsluice(tls_pg)) >= {("pgsluice auth", "t"),
                                                                       ("pgsluice control", "t")} and s)
        assert all(ssl_used == "t" for _, ssl_used in seen), seen
        timer = threading.Timer(0.5, conn.cancel_safe)  # the cancel key goes to Postgres over TLS
        timer.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("SELECT pg_sleep(10)")
        timer.join()


async def test_server_tls_refusals(proxy_factory: ProxyFactory, tls_pg: EmbeddedPostgres, pki: Pki) -> None:
    plain = proxy_factory("--upstream", tls_pg.dsn(), "--server-tls-mode", "disable")
    sqlstate, message = await _refusal("127.0.0.1", plain.port)
    assert sqlstate == "28000" and "no encryption" in message  # Postgres's own refusal, forwarded
    stranger = pki.dir / "stranger-ca.crt"
    stranger.write_bytes(Authority("not the server's CA").pem)
    wrong = proxy_factory("--upstream", tls_pg.dsn(), "--server-tls-mode", "verify-ca",
                          "--server-tls-ca", str(stranger))
    with pytest.raises(asyncpg.PostgresError) as info:
        await asyncpg.connect(host="127.0.0.1", port=wrong.port, user="alice", password=PW,
                              database="postgres", ssl=False)
    assert "certificate verify failed" in str(info.value)
    name = tls_pg.dsn().replace("127.0.0.1", "localhost")
    full = proxy_factory("--upstream", name, "--server-tls-mode", "verify-full", "--server-tls-ca",
                         str(pki.ca_file))
    conn = await asyncpg.connect(host="127.0.0.1", port=full.port, user="alice", password=PW,
                                 database="postgres", ssl=False)
    assert await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    await conn.close()


# ---- the other doors ------------------------------------------------------------------------------

async def test_grpc_door_over_tls(proxy_factory: ProxyFactory, pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "agents.toml"
    config.write_text('[pgsluice.agents.a]\ntoken = "tok"\nuser = "alice"\n'
                      f'password = "{PW}"\ndatabase = "postgres"\n')
    port = free_port()
    proxy_factory(*tls_args(pki, "--config", str(config), "--grpc-listen", f"127.0.0.1:{port}"))
    wait_until(lambda: port_open("127.0.0.1", port))  # the gRPC door opens after the wire door
    async with SluiceClient(f"localhost:{port}", token="tok", ca=str(pki.ca_file)) as db:
        assert await db.query("SELECT $1::int + 1 AS n", 41) == [{"n": 42}]
    async with SluiceClient(f"localhost:{port}", token="tok") as plain:
        with pytest.raises(SluiceError) as info:
            await asyncio.wait_for(plain.query("SELECT 1"), 10)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
    port2 = free_port()
    proxy_factory(*tls_args(pki, "--tls-ca", str(pki.ca_file), "--config", str(config),
                            "--grpc-listen", f"127.0.0.1:{port2}"))
    wait_until(lambda: port_open("127.0.0.1", port2))
    async with SluiceClient(f"localhost:{port2}", token="tok", ca=str(pki.ca_file),
                            cert=str(pki.alice_cert), key=str(pki.alice_key)) as db:
        assert await db.query("SELECT 1 AS one") == [{"one": 1}]
    async with SluiceClient(f"localhost:{port2}", token="tok", ca=str(pki.ca_file)) as db:
        with pytest.raises(SluiceError):
            await asyncio.wait_for(db.query("SELECT 1"), 10)


def test_metrics_over_tls(proxy_factory: ProxyFactory, pki: Pki) -> None:
    port = free_port()
    proxy_factory(*tls_args(pki, "--metrics-listen", f"127.0.0.1:{port}", "--metrics-tls"))
    ctx = ssl.create_default_context(cafile=str(pki.ca_file))
    body = wait_until(lambda: urllib.request.urlopen(f"https://localhost:{port}/metrics", context=ctx,
                                                     timeout=5).read(), ignore=(OSError,))
    assert b"pgsluice_queries" in body
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
