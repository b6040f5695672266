"""Planner costs: analyze() on a plan-cache hit, on a shape hit (new literals, no parse),
and on a miss (sqlglot parse + canonicalize + analyse) per query class.

    python -m loadtest.planner_bench [--seconds 0.5]

Runs in one process on one core; prints microseconds per call (median of 5 batches).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import sys
import time
from collections.abc import Callable

from planner import Planner, SessionFacts
from planner.policy import Policies

QUERIES = {
    "point select": "SELECT abalance FROM pgbench_accounts WHERE aid = {n}",
    "agent schema look-up": (
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = 'orders{n}' ORDER BY ordinal_position"),
    "join + aggregate": (
        "SELECT c.name, count(*), sum(o.total) FROM customers c JOIN orders o ON o.customer_id = c.id "
        "WHERE o.created_at > '2024-01-01' AND c.region IN ('eu', 'us', 'apac') AND o.total > {n} "
        "GROUP BY c.name ORDER BY 3 DESC LIMIT 10"),
    "TPC-H Q1": (
        "SELECT l_returnflag, l_linestatus, sum(l_quantity) AS sum_qty, "
        "sum(l_extendedprice) AS sum_base_price, sum(l_extendedprice * (1 - l_discount)) AS sum_disc_price, "
        "sum(l_extendedprice * (1 - l_discount) * (1 + l_tax)) AS sum_charge, avg(l_quantity) AS avg_qty, "
        "avg(l_extendedprice) AS avg_price, avg(l_discount) AS avg_disc, count(*) AS count_order "
        "FROM lineitem WHERE l_shipdate <= date '1998-12-01' - interval '{n} days' "
        "GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus"),
    "TPC-H Q9": (
        "SELECT nation, o_year, sum(amount) AS sum_profit FROM (SELECT n_name AS nation, "
        "extract(year FROM o_orderdate) AS o_year, l_extendedprice * (1 - l_discount) - ps_supplycost * "
        "l_quantity AS amount FROM part, supplier, lineitem, partsupp, orders, nation WHERE s_suppkey = "
        "l_suppkey AND ps_suppkey = l_suppkey AND ps_partkey = l_partkey AND p_partkey = l_partkey AND "
        "o_orderkey = l_orderkey AND s_nationkey = n_nationkey AND p_name LIKE '%green{n}%') AS profit "
        "GROUP BY nation, o_year ORDER BY nation, o_year DESC"),
    "write": "UPDATE pgbench_accounts SET abalance = abalance + {n} WHERE aid = 17",
    "DDL (new name each time)": "ALTER TABLE orders{n} ADD COLUMN note text",
}


def per_call_us(fn: Callable[[], object], seconds: float) -> float:
    """Median microseconds per call over 5 batches of about `seconds` / 5 each."""
    fn()
    n = 1
    while True:  # size a batch
        t = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t > seconds / 50:
            break
        n *= 2
    runs = []
    batch = max(1, int(n * 10))
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(batch):
            fn()
        runs.append((time.perf_counter() - t) / batch * 1e6)
    return statistics.median(runs)


def measure(planner: Planner, template: str, facts: SessionFacts, guarded: SessionFacts,
            seconds: float) -> tuple[float, float, float, float]:
    texts = (template.format(n=n) for n in itertools.count(2))
    first = template.format(n=1)
    return (per_call_us(lambda: planner.analyze(first, facts), seconds),
            per_call_us(lambda: planner.analyze(next(texts), facts), seconds),
            per_call_us(lambda: planner.build(next(texts), facts), seconds),
            per_call_us(lambda: planner.build(next(texts), guarded), seconds))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=0.5, help="time per measurement (default 0.5)")
    args = p.parse_args(argv)
    print("command: python -m loadtest.planner_bench " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"python {platform.python_version()} on {platform.machine()}; microseconds per analyze() call")
    facts = SessionFacts()
    guarded = SessionFacts(role_policy="bench")
    policies = Policies.from_toml({"bench": {"read_only": True, "max_rows": 1000,
                                             "deny": ["pg_sleep", "ddl", "set_role"]}})
    print(f"{'query class':<26} {'hit':>7} {'shape hit':>10} {'miss':>9} {'miss+guard':>11}")
    for name, template in QUERIES.items():
        hit, shape, miss, miss_g = measure(Planner(policies=policies), template, facts, guarded, args.seconds)
        print(f"{name:<26} {hit:>7.2f} {shape:>10.1f} {miss:>9.0f} {miss_g:>11.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
