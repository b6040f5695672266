"""The `pgsluice` command: serve, mcp, config, explain, check-config, install-change-feed, load, demo,
make-cert."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from cache.versions import SharedCounters
from proxy import __version__
from proxy.base.config import FIELD_KINDS, Config, load, to_toml
from proxy.base.errors import ConfigError
from proxy.ops.loop import install_loop


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML config file ([pgsluice] table)")
    for f in fields(Config):
        if f.name not in FIELD_KINDS:
            continue  # roles: TOML tables only
        flag = "--" + f.name.replace("_", "-")
        kind = FIELD_KINDS[f.name]
        if kind == "bool":
            parser.add_argument(flag, dest=f.name, default=None,
                                action=argparse.BooleanOptionalAction)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper())


def _config_from(args: argparse.Namespace) -> Config:
    flags = {name: getattr(args, name) for name in FIELD_KINDS}
    return load(flags, file=args.config)


def setup_logging(config: Config) -> None:
    from proxy.base.logs import setup
    setup(config.log_level, config.log_format)


async def serve(config: Config, reload_from: Callable[[], Config] | None = None,
                shared: SharedCounters | None = None, worker: int = 0, stats_dir: str | None = None) -> None:
    from proxy.ops.server import Server

    server = Server(config, shared, worker, stats_dir)
    server.reload_config = reload_from
    await server.start()
    stop = server.stop_requested
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    loop.add_signal_handler(signal.SIGUSR1, server.pause_here)  # from the workers' parent
    loop.add_signal_handler(signal.SIGUSR2, server.resume_here)
    await stop.wait()
    logging.getLogger("pgsluice").info("shutting down")
    await server.shutdown()


async def install_change_feed(config: Config, databases: list[str] | None, uninstall: bool) -> int:
    """`pgsluice install-change-feed`: needs a superuser (event triggers)."""
    import asyncpg

    from cache.feed import install
    from cache.feed import uninstall as remove
    from proxy.base.config import mask_url, parse_upstream
    from proxy.base.tls import asyncpg_ssl, upstream_tls

    url = parse_upstream(config.upstream)
    for database in databases or [url.database]:
        try:
            conn = await asyncpg.connect(host=url.host, port=url.port, user=url.user,
                                         password=url.password, database=database,
                                         timeout=config.connect_timeout,
                                         ssl=asyncpg_ssl(upstream_tls(config), url.host))
        except (OSError, asyncpg.PostgresError) as exc:
            print(f"pgsluice: cannot connect to {database} at {mask_url(config.upstream)}: {exc}",
                  file=sys.stderr)
            return 1
        try:
            if uninstall:
                await remove(conn)
                print(f"{database}: change feed removed")
            else:
                watched = await install(conn)
                print(f"{database}: change feed installed; {watched} tables watched, "
                      "new tables are watched as they are created")
        except asyncpg.PostgresError as exc:
            print(f"pgsluice: {database}: {exc} (the change feed needs a superuser: event triggers)",
                  file=sys.stderr)
            return 1
        finally:
            await conn.close()
    return 0


def make_cert(folder: str, hosts: list[str], clients: list[str], keep: bool = False) -> int:
    """`pgsluice make-cert`: for trying TLS; production certificates come from your own CA."""
    from pathlib import Path

    from proxy.ops.certs import make_server_files

    files = make_server_files(Path(folder), hosts, clients, keep)
    for name, path in files.items():
        print(f"{name}: {path}")
    print(f"\nserve with --tls-cert {files['cert']} --tls-key {files['key']}; clients verify with "
          f"sslmode=verify-full sslrootcert={files['ca']}")
    return 0


def run_mcp(config: Config) -> int:
    """`pgsluice mcp`: stdout carries the protocol, so logs go to stderr (they do)."""
    from proxy.doors.mcp.door import stdio_agent
    from proxy.ops.mcp_stdio import serve_stdio
    try:
        stdio_agent(config)
    except ConfigError as exc:
        print(f"pgsluice: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve_stdio(config))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["load"]:  # the load generator owns its arguments
        from loadtest.load import main as load_main
        return load_main(argv[1:])
    parser = build_parser()
    return run(parser, parser.parse_args(argv))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pgsluice", description=__doc__)
    parser.add_argument("--version", action="version", version=f"pgsluice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the proxy")
    _add_config_flags(p_serve)
    p_mcp = sub.add_parser("mcp", help="serve MCP over stdin/stdout as one agent (for agent runtimes)")
    _add_config_flags(p_mcp)
    p_config = sub.add_parser("config", help="print the effective config, secrets masked")
    _add_config_flags(p_config)
    p_config.add_argument("--json", action="store_true", help="print JSON instead of TOML")
    p_explain = sub.add_parser("explain", help="print the planner's view of a query")
    _add_config_flags(p_explain)
    p_explain.add_argument("sql", help="the query text")
    p_explain.add_argument("--database", default=None, help="catalog of this database (default: upstream's)")
    p_explain.add_argument("--user", default=None, help="session user (default: upstream's)")
    p_explain.add_argument("--application-name", default="", help="picks the role policy, as at login")
    p_explain.add_argument("--search-path", default="\"$user\", public")
    p_explain.add_argument("--no-catalog", action="store_true", help="do not connect to Postgres")
    p_check = sub.add_parser("check-config", help="validate a config file (errors name file:line)")
    p_check.add_argument("file", help="TOML config file")
    p_feed = sub.add_parser("install-change-feed",
                            help="install the change feed (triggers + NOTIFY) in the upstream databases")
    _add_config_flags(p_feed)
    p_feed.add_argument("--database", action="append", default=None,
                        help="database to install into (repeatable; default: the upstream URL's)")
    p_feed.add_argument("--uninstall", action="store_true", help="remove it instead")
    sub.add_parser("load", help="the agent-shaped load generator (pgsluice load --help)", add_help=False)
    p_cert = sub.add_parser("make-cert", help="write a throw-away CA and certificates for tls_cert/tls_key")
    p_cert.add_argument("dir", help="folder for ca.crt, server.crt and server.key (and client certificates)")
    p_cert.add_argument("--host", action="append", default=None,
                        help="a name or address clients connect to (repeatable; "
                             "default: localhost, 127.0.0.1)")
    p_cert.add_argument("--client", action="append", default=[],
                        help="also a client certificate for this user name (repeatable), for tls_ca")
    p_cert.add_argument("--keep", action="store_true",
                        help="leave certificates already in DIR alone (docker compose up, again)")
    p_demo = sub.add_parser("demo", help="embedded Postgres + pgsluice + a scripted session")
    p_demo.add_argument("--once", action="store_true", help="exit after the scripted session")
    p_demo.add_argument("--port", type=int, default=6543, help="pgsluice port (0 = any free)")
    p_demo.add_argument("--data-dir", default=None, help="keep the demo database here")
    p_demo.add_argument("--no-load", dest="side_by_side", action="store_false",
                        help="skip the side-by-side load run (direct vs pgsluice)")
    return parser


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "check-config":
            checked = load({}, env={}, file=args.file)
            roles = len(checked.roles.roles)
            print(f"{args.file}: ok ({roles} roles; upstream {checked.masked()['upstream']})")
            return 0
        if args.command == "make-cert":
            return make_cert(args.dir, args.host or ["localhost", "127.0.0.1"], args.client, args.keep)
        if args.command == "demo":
            from proxy.ops.demo import run_demo
            return run_demo(once=args.once, port=args.port, data_dir=args.data_dir,
                            side_by_side=args.side_by_side)
        config = _config_from(args)
    except ConfigError as exc:
        print(f"pgsluice: {exc}", file=sys.stderr)
        return 2
    if args.command == "explain":
        from proxy.ops.explain import run_explain
        return run_explain(config, args)
    if args.command == "install-change-feed":
        return asyncio.run(install_change_feed(config, args.database, args.uninstall))
    if args.command == "config":
        masked: dict[str, Any] = config.masked()
        print(json.dumps(masked, indent=2) if args.json else to_toml(masked), end="")
        return 0
    setup_logging(config)
    install_loop(config)
    if args.command == "mcp":
        return run_mcp(config)
    if config.workers > 1:
        from proxy.ops.workers import run_workers
        return run_workers(config, lambda: _config_from(args), serve)
    try:
        asyncio.run(serve(config, lambda: _config_from(args)))
    except OSError as exc:
        print(f"pgsluice: cannot listen on {config.listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
