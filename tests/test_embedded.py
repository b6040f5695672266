"""The embedded PostgreSQL and the session `pg` fixture are real and set up as promised."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from proxy.ops.embedded import EmbeddedPostgres, EmbeddedPostgresError
from tests.util import PASSWORDS, port_open

ROLPASSWORD = "SELECT rolpassword FROM pg_authid WHERE rolname = $1"


async def fetchval(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetchval(sql, *args)
    finally:
        await conn.close()


async def test_superuser_over_tcp_with_scram(pg: EmbeddedPostgres) -> None:
    assert pg.host == "127.0.0.1"
    assert await fetchval(pg.dsn(), "SELECT current_user") == "postgres"
    stored = await fetchval(pg.dsn(), ROLPASSWORD, "postgres")
    assert stored.startswith("SCRAM-SHA-256$")
    conn = await asyncpg.connect(pg.dsn())
    try:
        rows = await conn.fetch("SELECT auth_method FROM pg_hba_file_rules WHERE type = 'host'")
        assert "scram-sha-256" in {r["auth_method"] for r in rows}
    finally:
        await conn.close()


async def test_alice_and_bob_can_create_tables_in_app(pg: EmbeddedPostgres) -> None:
    for role in ("alice", "bob"):
        assert await fetchval(pg.dsn(role, PASSWORDS[role]), "SELECT current_user") == role
        conn = await asyncpg.connect(pg.dsn(role, PASSWORDS[role], database="app"))
        try:
            await conn.execute(f"CREATE TABLE {role}_t (id int); DROP TABLE {role}_t")
            assert await conn.fetchval("SELECT current_database()") == "app"
        finally:
            await conn.close()


async def test_wrong_password_is_28p01(pg: EmbeddedPostgres) -> None:
    with pytest.raises(asyncpg.InvalidPasswordError) as excinfo:
        await fetchval(pg.dsn("alice", "not-alice-pw"), "SELECT 1")
    assert excinfo.value.sqlstate == "28P01"


async def test_md5_user_logs_in_with_md5(pg: EmbeddedPostgres) -> None:
    dsn = pg.dsn("md5_user", PASSWORDS["md5_user"])
    assert await fetchval(dsn, "SELECT current_user") == "md5_user"
    stored = await fetchval(pg.dsn(), ROLPASSWORD, "md5_user")
    assert stored.startswith("md5")


async def test_trusted_user_needs_no_password(pg: EmbeddedPostgres) -> None:
    assert "trusted_user:" not in pg.dsn("trusted_user")
    assert await fetchval(pg.dsn("trusted_user"), "SELECT current_user") == "trusted_user"


async def test_app_database_is_owned_by_alice(pg: EmbeddedPostgres) -> None:
    owner = await fetchval(
        pg.dsn(),
        "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
        "app",
    )
    assert owner == "alice"


async def test_server_settings(pg: EmbeddedPostgres) -> None:
    conn = await asyncpg.connect(pg.dsn())
    try:
        settings = {
            name: await conn.fetchval(f"SHOW {name}")
            for name in ("listen_addresses", "max_connections", "fsync", "synchronous_commit",
                         "full_page_writes", "server_encoding")
        }
        collate = await conn.fetchval(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()"
        )
    finally:
        await conn.close()
    assert settings == {
        "listen_addresses": "127.0.0.1",
        "max_connections": "200",
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "server_encoding": "UTF8",
    }
    assert collate == "C"
    assert pg.logfile.parent == pg.datadir and pg.logfile.exists()
    assert (pg.socket_dir / f".s.PGSQL.{pg.port}").is_socket()


def test_psql_returns_output_and_raises_on_error(pg: EmbeddedPostgres) -> None:
    assert pg.psql("SELECT 1 + 1; SELECT 'x'").split() == ["2", "x"]
    assert pg.psql("SELECT current_database()", db="app").strip() == "app"
    with pytest.raises(EmbeddedPostgresError, match="no_such_table"):
        pg.psql("SELECT 1; SELECT * FROM no_such_table; SELECT 2")


async def test_dsn_quotes_special_characters(pg: EmbeddedPostgres) -> None:
    password = "p@ss:/w%rd?#'x y"
    sql_literal = password.replace("'", "''")
    pg.psql(f"CREATE ROLE \"odd user\" LOGIN PASSWORD '{sql_literal}'")
    try:
        dsn = pg.dsn("odd user", password)
        assert await fetchval(dsn, "SELECT current_user") == "odd user"
    finally:
        pg.psql('DROP ROLE "odd user"')


@pytest.mark.parametrize("tool", ["psql", "pgbench"])
def test_client_binaries_run(pg: EmbeddedPostgres, tool: str) -> None:
    exe = pg.bin_dir / tool
    assert exe.exists()
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert "PostgreSQL" in out.stdout


async def test_restart_and_idempotent_stop(pg_tmp_dir: Path) -> None:
    server = EmbeddedPostgres(
        pg_tmp_dir / "data", password="s3cret", extra_conf={"work_mem": "8MB"}
    )
    try:
        server.start()
        assert await fetchval(server.dsn(), "SHOW work_mem") == "8MB"
        server.psql("CREATE TABLE keep (v int); INSERT INTO keep VALUES (42)")
        server.stop()
        server.stop()
        assert not port_open(server.host, server.port)
        server.start()  # reuses the data directory: no initdb
        assert await fetchval(server.dsn(), "SELECT v FROM keep") == 42
    finally:
        server.stop()
    assert not (server.datadir / "postmaster.pid").exists()
    assert not server.socket_dir.exists()
