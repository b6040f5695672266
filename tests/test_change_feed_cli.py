"""`pgsluice install-change-feed` and `--uninstall` against a real database."""

from __future__ import annotations

import subprocess
import sys

from proxy.ops.embedded import EmbeddedPostgres


def _run(pg: EmbeddedPostgres, *args: str, user: str = "postgres", password: str = "postgres"
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "proxy", "install-change-feed", "--upstream",
                           pg.dsn(user=user, password=password), *args],
                          capture_output=True, text=True, timeout=60)


def test_install_watch_new_tables_and_uninstall(pg: EmbeddedPostgres) -> None:
    pg.psql("DROP DATABASE IF EXISTS feedcli WITH (FORCE); CREATE DATABASE feedcli")
    pg.psql("CREATE TABLE a (x int); CREATE TABLE b (y int)", db="feedcli")
    res = _run(pg, "--database", "feedcli")
    assert res.returncode == 0, res.stderr
    assert "feedcli: change feed installed; 2 tables watched" in res.stdout
    pg.psql("CREATE TABLE c (z int)", db="feedcli")  # watched as it is created
    watched = pg.psql("SELECT string_agg(c.relname || ':' || t.tgname, ',' ORDER BY c.relname, t.tgname) "
                      "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid WHERE t.tgname ~ '^pgsluice_'",
                      db="feedcli").strip()
    ops = ("delete", "insert", "truncate", "update")
    assert watched == ",".join(f"{rel}:pgsluice_feed_{op}" for rel in "abc" for op in ops)
    assert _run(pg, "--database", "feedcli").returncode == 0  # idempotent
    res = _run(pg, "--database", "feedcli", "--uninstall")
    assert res.returncode == 0 and "removed" in res.stdout
    left = pg.psql("SELECT count(*) FROM pg_trigger WHERE tgname ~ '^pgsluice_'", db="feedcli")
    assert left.strip() == "0"


def test_a_non_superuser_gets_a_clear_error(pg: EmbeddedPostgres) -> None:
    res = _run(pg, "--database", "app", user="alice", password="alice-pw")
    assert res.returncode == 1
    assert "needs a superuser" in res.stderr
