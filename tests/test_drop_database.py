"""DROP DATABASE and ALTER DATABASE ... RENAME through pgsluice: its own idle server
connections (and change-feed listener) to that database, on every worker, are not in the way
(Postgres refuses with 55006 "being accessed by other users" while any are connected)."""

from __future__ import annotations

import time

import psycopg
import pytest

from cache.feed import INSTALL
from proxy.ops.embedded import EmbeddedPostgres
from tests.util import ProxyFactory, ProxyHandle


def use(proxy: ProxyHandle, database: str, clients: int) -> None:
    """Leave idle server connections to `database` in the pools (clients at once, then gone)."""
    conns = [psycopg.connect(proxy.dsn(database=database), autocommit=True) for _ in range(clients)]
    for conn in conns:
        conn.execute("BEGIN")  # each holds its own server connection at the same time
        conn.execute("SELECT count(*) FROM pg_class")
    for conn in conns:
        conn.execute("COMMIT")
        conn.close()


def server_connections(pg: EmbeddedPostgres, database: str) -> int:
    return int(pg.psql(f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{database}'"))


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("statement", ["DROP DATABASE {db}", "ALTER DATABASE {db} RENAME TO {db}_renamed"])
def test_database_ddl_not_blocked_by_the_pool(pg: EmbeddedPostgres, proxy_factory: ProxyFactory,
                                              workers: int, statement: str) -> None:
    db = f"dropme_{workers}"
    pg.psql(f"DROP DATABASE IF EXISTS {db}; DROP DATABASE IF EXISTS {db}_renamed; CREATE DATABASE {db}")
    pg.psql(INSTALL, db=db)  # the change feed: pgsluice LISTENs on a connection of its own there
    proxy = proxy_factory(env={"PGSLUICE_WORKERS": str(workers)})
    try:
        for _ in range(3 * workers):  # the kernel spreads connections over the workers
            use(proxy, db, 3)
        deadline = time.monotonic() + 10
        while server_connections(pg, db) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server_connections(pg, db) >= 3, "pgsluice keeps no idle connection there"
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute(statement.format(db=db).encode())
        assert server_connections(pg, db) == 0
    finally:
        pg.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE);"
                f" DROP DATABASE IF EXISTS {db}_renamed WITH (FORCE)")


def test_database_comes_back(pg: EmbeddedPostgres, proxy_factory: ProxyFactory) -> None:
    """Dropped (in a Parse this time) and created again under the same name: usable through
    pgsluice as before."""
    pg.psql("DROP DATABASE IF EXISTS again; CREATE DATABASE again")
    proxy = proxy_factory()
    try:
        use(proxy, "again", 2)
        with psycopg.connect(proxy.dsn(), autocommit=True) as conn:
            conn.execute("DROP DATABASE again", prepare=True)  # over the extended protocol
            conn.execute("CREATE DATABASE again")
        with psycopg.connect(proxy.dsn(database="again"), autocommit=True) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("again",)
    finally:
        pg.psql("DROP DATABASE IF EXISTS again WITH (FORCE)")
