"""Fault test (a standing check): Postgres restarted under writing clients, twice (a fast
shutdown, then a crash), behind pgsluice with two workers. Nothing a client was told was
committed is lost, nothing is written twice (pgsluice never sends a statement again on its
own), writes go through again soon after Postgres is back, and reads through pgsluice are
not stale afterwards.

Postgres runs with fsync and synchronous_commit on here: a commit it acknowledged survives
its own crash, so whatever goes missing would be pgsluice's doing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from cache.feed import INSTALL
from proxy.ops.embedded import EmbeddedPostgres, free_port
from tests.util import port_open, wait_until

WRITERS = 20
REPO_ROOT = Path(__file__).resolve().parent.parent


class Ledger:
    def __init__(self) -> None:
        self.acked: set[int] = set()
        self.unknown: set[int] = set()  # sent, then an error: committed or not, either is right
        self.last_ack = 0.0
        self.timeouts = 0  # units of work with no answer for 10 s


async def writer(dsn: str, client: int, ledger: Ledger, stop: asyncio.Event) -> None:
    seq = 0
    conn: asyncpg.Connection | None = None
    while not stop.is_set():
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn, timeout=2)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            conn = None
            await asyncio.sleep(0.05)
            continue
        seq += 1
        ids = [client * 1_000_000 + seq * 10 + k for k in range(1 + seq % 3)]
        try:
            async with asyncio.timeout(10):
                if len(ids) == 1:  # autocommit
                    await conn.execute("INSERT INTO ledger VALUES ($1, $2)", ids[0], client)
                else:  # an explicit transaction: acknowledged by its COMMIT
                    async with conn.transaction():
                        for i in ids:
                            await conn.execute("INSERT INTO ledger VALUES ($1, $2)", i, client)
        except TimeoutError:
            ledger.timeouts += 1
            ledger.unknown.update(ids)
            conn.terminate()
            conn = None
            continue
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError):  # asyncpg's own, after a timeout on a slow machine
            ledger.unknown.update(ids)
            conn.terminate()
            conn = None
            continue
        ledger.acked.update(ids)
        ledger.last_ack = time.monotonic()
    if conn is not None:
        await conn.close()


def restart(pg: EmbeddedPostgres, how: str) -> None:
    if how == "crash":  # the postmaster and every backend killed: recovery from WAL
        pg._run([str(pg.bin_dir / "pg_ctl"), "stop", "-D", str(pg.datadir), "-m", "immediate", "-w"],
                check=False)
    else:
        pg.stop()
    pg._running = False
    pg.start()


async def run(pg: EmbeddedPostgres, dsn: str) -> tuple[Ledger, list[float]]:
    ledger = Ledger()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(writer(dsn, c, ledger, stop)) for c in range(1, WRITERS + 1)]
    recoveries = []
    try:
        for how in ("fast", "crash"):
            before = len(ledger.acked)
            deadline = time.monotonic() + 20
            while len(ledger.acked) < before + 200:  # writes flowing before each restart
                assert time.monotonic() < deadline, f"only {len(ledger.acked) - before} writes in 20 s"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(restart, pg, how)
            back = time.monotonic()
            while ledger.last_ack < back:  # the first write acknowledged after Postgres is back
                assert time.monotonic() - back < 15, f"no write went through after the {how} restart"
                await asyncio.sleep(0.02)
            recoveries.append(ledger.last_ack - back)
        await asyncio.sleep(1)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    return ledger, recoveries


def test_postgres_restarts_under_writers(pg_tmp_dir: Path) -> None:
    own = EmbeddedPostgres(pg_tmp_dir / "data", extra_conf={"fsync": "on", "synchronous_commit": "on"})
    own.start()
    own.psql("CREATE TABLE ledger (id bigint, client int)")  # no key: a duplicate would show
    own.psql(INSTALL)
    port = free_port()
    # the log goes to a file: a pipe nobody reads fills up and blocks pgsluice's event loops
    proc = subprocess.Popen([sys.executable, "-m", "proxy", "serve", "--upstream", own.dsn(),
                             "--listen", f"127.0.0.1:{port}", "--metrics-listen", "", "--grpc-listen", "",
                             "--workers", "2", "--pool-max-size", "10"],
                            cwd=REPO_ROOT, stdout=(pg_tmp_dir / "pgsluice.log").open("wb"),
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: port_open("127.0.0.1", port), timeout=15)
        dsn = f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres"
        ledger, recoveries = asyncio.run(run(own, dsn))
        rows = own.psql("SELECT id FROM ledger").split()
        stored = [int(r) for r in rows]
        assert len(stored) == len(set(stored)), "a row was written twice"
        lost = ledger.acked - set(stored)
        assert not lost, f"{len(lost)} acknowledged writes lost, e.g. {sorted(lost)[:5]}"
        phantom = set(stored) - ledger.acked - ledger.unknown
        assert not phantom, f"rows nobody wrote: {sorted(phantom)[:5]}"
        assert max(recoveries) < 5, f"writes resumed {recoveries} s after Postgres was back"
        print(f"{len(ledger.acked)} writes acknowledged, {len(ledger.unknown)} unknown "
              f"({ledger.timeouts} timed out); writes resumed "
              f"{', '.join(f'{r:.2f}' for r in recoveries)} s after the fast / crash restart")

        async def read_through() -> int:
            conn = await asyncpg.connect(dsn)
            try:
                return int(await conn.fetchval("SELECT count(*) FROM ledger"))
            finally:
                await conn.close()

        assert asyncio.run(read_through()) == len(stored)  # not a count cached before
    except BaseException:
        stop(proc)
        lines = (pg_tmp_dir / "pgsluice.log").read_text(errors="replace").splitlines()
        notable = [line for line in lines if " INFO " not in line]
        print("--- pgsluice's log (all but INFO lines) ---", *notable[-80:], sep="\n")
        print(f"--- postgres log ---\n{own.log_tail(60)}")
        raise
    finally:
        stop(proc)
        own.stop()
    log = (pg_tmp_dir / "pgsluice.log").read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
