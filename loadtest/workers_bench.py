"""Worker scaling: pgsluice with --workers 1 and --workers 2, cached point reads and passthrough
(the cache off), pgbench -M simple, in one run.

    python -m loadtest.workers_bench [--duration 10] [--workers 1,2] [--json out.json]

Uses cache_bench's embedded Postgres, sample schema and `point` workload (1,000 hot keys;
8 clients). Passthrough runs the same reads with `--no-cache`, so every one reaches Postgres.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path

from loadtest.cache_bench import prepare, run_pgbench, server
from loadtest.passthrough import pgsluice
from loadtest.pgbench import find_pg_tool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.workers_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--workers", default="1,2", help="comma list of worker counts (default 1,2)")
    p.add_argument("--pool-size", type=int, default=10)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    print(f"command: {' '.join([sys.executable, '-m', 'loadtest.workers_bench', *sys.argv[1:]])}\n"
          f"cores: {os.cpu_count()}  loadavg: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    results: list[dict[str, object]] = []
    with server(None) as (up, bin_dir):
        pgbench = find_pg_tool("pgbench", bin_dir)
        asyncio.run(prepare(up, 1))
        for mode, extra in (("cached", ()), ("passthrough", ("--no-cache",))):
            for n in counts:
                flags = (*extra, "--workers", str(n), "--metrics-listen", "")
                with pgsluice(up, args.pool_size, extra=flags) as (ep, _pid), \
                        tempfile.TemporaryDirectory() as logs:
                    run_pgbench(pgbench, ep, "point", args.warmup, None)
                    _cmd, res, lat = run_pgbench(pgbench, ep, "point", args.duration, Path(logs))
                lat.sort()
                row = {"mode": mode, "workers": n, "tps": res.tps, "ok": res.ok,
                       "avg_ms": sum(lat) / len(lat) if lat else None,
                       "p99_ms": lat[int(len(lat) * 0.99) - 1] if lat else None}
                results.append(row)
                print(f"  {mode:<12} workers={n}  {res.tps or 0:>10.1f} tps", flush=True)
    print(f"\n{'mode':<12} {'workers':>7} {'tps':>10} {'avg ms':>8} {'p99 ms':>8} {'vs 1 worker':>12}")
    for r in results:
        base = next((b["tps"] for b in results if b["mode"] == r["mode"] and b["workers"] == counts[0]), None)
        ratio = f"{float(str(r['tps'])) / float(str(base)):.2f}" if base and r["tps"] else "-"
        avg = f"{r['avg_ms']:.3f}" if isinstance(r["avg_ms"], float) else "-"
        p99 = f"{r['p99_ms']:.3f}" if isinstance(r["p99_ms"], float) else "-"
        tps = float(str(r["tps"] or 0))
        print(f"{r['mode']:<12} {r['workers']:>7} {tps:>10.1f} {avg:>8} {p99:>8} {ratio:>12}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
