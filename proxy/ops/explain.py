"""`pgsluice explain "SQL"`: the planner's view of a query, with catalog facts from the
upstream Postgres (unless --no-catalog) and the role policy the session would get."""

from __future__ import annotations

import argparse
import asyncio
import sys

import asyncpg

from planner import Catalog, Planner, SessionFacts
from planner.catalog import load
from planner.explain import describe
from proxy.base.config import Config, parse_upstream
from proxy.base.tls import asyncpg_ssl, upstream_tls


async def _catalog(config: Config, database: str) -> Catalog:
    url = parse_upstream(config.upstream)
    conn = await asyncpg.connect(host=url.host, port=url.port, user=url.user, password=url.password,
                                 database=database, timeout=config.connect_timeout,
                                 ssl=asyncpg_ssl(upstream_tls(config), url.host))
    try:
        return await load(conn)
    finally:
        await conn.close()


def run_explain(config: Config, args: argparse.Namespace) -> int:
    url = parse_upstream(config.upstream)
    database = args.database or url.database
    user = args.user or url.user
    catalog = Catalog()
    if not args.no_catalog:
        try:
            catalog = asyncio.run(_catalog(config, database))
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            print(f"pgsluice: no catalog from {database} ({exc}); explaining without it", file=sys.stderr)
    policy = config.roles.for_session(user, args.application_name)
    path = tuple(p.strip() for p in args.search_path.split(",") if p.strip())
    facts = SessionFacts(database, user, tuple(p.strip('"') for p in path), policy.name if policy else "")
    planner = Planner(catalog, policies=config.roles)
    print(describe(planner.analyze(args.sql, facts)), end="")
    if policy is not None:
        print(f"role:        {policy.name}")
    return 0
