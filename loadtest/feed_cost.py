"""What the change feed's triggers cost a writer: single-row statements and a 100,000-row UPDATE,
with and without the feed installed, on an embedded PostgreSQL (nothing else running on it).

    python -m loadtest.feed_cost [--rows 100000] [--single 3000] [--json out.json]

Each measurement alternates: feed off, feed on, off, on... (`--rounds` times), and reports the
median per configuration, so drift on a shared machine hits both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import asyncpg

from cache.feed import install, uninstall
from loadtest import run_script
from proxy.ops.embedded import EmbeddedPostgres

SCHEMA = """
DROP TABLE IF EXISTS feed_cost;
CREATE TABLE feed_cost (id bigint PRIMARY KEY, name text NOT NULL, n int NOT NULL, at timestamptz);
INSERT INTO feed_cost SELECT g, 'row ' || g, g % 100, now() FROM generate_series(1, {rows}) g;
"""


async def _single(conn: asyncpg.Connection, count: int, rows: int) -> dict[str, float]:
    """Microseconds per statement, client-side, one connection, prepared statements."""
    out = {}
    update = await conn.prepare("UPDATE feed_cost SET at = now() WHERE id = $1")
    insert = await conn.prepare("INSERT INTO feed_cost VALUES ($1, 'new', 0, now())")
    delete = await conn.prepare("DELETE FROM feed_cost WHERE id = $1")
    for name, stmt, base in (("update 1 row", update, 0), ("insert 1 row", insert, rows + 1),
                             ("delete 1 row", delete, rows + 1)):
        started = time.perf_counter()
        for i in range(count):
            await stmt.fetch(base + (i % rows if base == 0 else i))
        out[name] = (time.perf_counter() - started) / count * 1e6
    return out


async def _bulk(conn: asyncpg.Connection) -> float:
    started = time.perf_counter()
    await conn.execute("UPDATE feed_cost SET n = n + 1")
    return (time.perf_counter() - started) * 1000


async def measure(dsn: str, rows: int, single: int, rounds: int) -> dict[str, dict[str, float]]:
    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA.format(rows=rows))
    await conn.execute("VACUUM ANALYZE feed_cost")
    samples: dict[str, dict[str, list[float]]] = {"off": {}, "on": {}}
    for _ in range(rounds):
        for mode in ("off", "on"):
            if mode == "on":
                await install(conn)
            else:
                await uninstall(conn)
            await conn.execute("VACUUM feed_cost")
            got = await _single(conn, single, rows)
            got[f"update {rows:,} rows (ms)"] = await _bulk(conn)
            for key, value in got.items():
                samples[mode].setdefault(key, []).append(value)
    await conn.close()
    return {mode: {k: statistics.median(v) for k, v in per.items()} for mode, per in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--single", type=int, default=3000, help="single-row statements per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgsluice-feedcost-") as tmp:
        Path(tmp).chmod(0o755)
        pg = EmbeddedPostgres(Path(tmp) / "data")
        pg.start()
        try:
            result = asyncio.run(measure(pg.dsn(), args.rows, args.single, args.rounds))
        finally:
            pg.stop()
    print(f"{'statement':<28}{'no feed':>12}{'feed':>12}{'cost':>10}")
    for key in result["off"]:
        off, on = result["off"][key], result["on"][key]
        unit = "" if "(ms)" in key else " us"
        print(f"{key:<28}{off:>9.1f}{unit:<3}{on:>9.1f}{unit:<3}{(on / off - 1) * 100:>+9.0f}%")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    run_script(main)
