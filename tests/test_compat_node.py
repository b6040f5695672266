"""node-postgres through pgsluice: tests/node/pg_client.js against real Postgres.

The script runs parameterized queries, named prepared statements (parsed once per
connection, then executed by name: on whichever server connection the proxy picks),
transactions, and a pool of 20 node clients over 3 server connections, and prints a
JSON summary. node_modules comes from `npm ci` (package-lock.json) when missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.util import PASSWORDS, ProxyFactory

NODE_DIR = Path(__file__).resolve().parent / "node"
NPM_TIMEOUT = 300


@pytest.fixture(scope="module")
def node_modules() -> Path:
    """tests/node/node_modules with node-postgres in it, installed with `npm ci` if missing."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.fail("node and npm are needed for the node-postgres compatibility tests")
    modules = NODE_DIR / "node_modules"
    if not (modules / "pg" / "package.json").is_file():
        res = subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR, capture_output=True, text=True, timeout=NPM_TIMEOUT, check=False,
        )  # fmt: skip
        assert res.returncode == 0, f"npm ci failed ({res.returncode}):\n{res.stdout}\n{res.stderr}"
    assert (modules / "pg" / "package.json").is_file()
    return modules


def test_node_postgres(proxy_factory: ProxyFactory, node_modules: Path) -> None:
    proxy = proxy_factory("--pool-max-size", "3")
    dsn = proxy.dsn("alice", PASSWORDS["alice"], "app")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    try:
        res = subprocess.run(["node", str(NODE_DIR / "pg_client.js"), dsn, "node_compat"],
                             cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60,
                             check=False)  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"pg_client.js did not finish in {exc.timeout}s\nstdout: {exc.stdout!r}\n"
                    f"stderr: {exc.stderr!r}\nproxy log:\n{proxy.log_text()[-4000:]}")
    where = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    lines = res.stdout.strip().splitlines()
    assert lines, where
    summary = json.loads(lines[-1])
    assert summary["ok"] is True, summary.get("error", where)
    assert res.returncode == 0, where
    checks = summary["checks"]
    assert checks["parameterized"] is True
    assert checks["named_prepared"] is True
    assert checks["transaction"] is True
    assert checks["own_statements"] == 20
    assert checks["pool"] == {"clients": 20, "tasks": 200, "inserted": 50}
