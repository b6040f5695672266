"""Base fixtures: a session-wide real PostgreSQL (`pg`) and proxy subprocesses (`proxy_factory`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Generator, Iterator, Mapping
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # the package is not installed into the venv
    sys.path.insert(0, str(REPO_ROOT))

from proxy.ops.embedded import EmbeddedPostgres, free_port  # noqa: E402
from tests.util import PASSWORDS, ProxyFactory, ProxyHandle, port_open, wait_until  # noqa: E402

PROXY_START_TIMEOUT = 15.0

# -- remember each phase's report so fixtures can tell whether their test failed -----------
_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def request_failed(request: pytest.FixtureRequest) -> bool:
    """True if the setup or call phase of the requesting test failed (use in teardown)."""
    reports = request.node.stash.get(_REPORTS, {})
    return any(rep.failed for rep in reports.values())


def make_traversable_tmpdir(prefix: str) -> Path:
    """A temp dir the unprivileged PostgreSQL OS user can traverse (mkdtemp gives 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


# -- PostgreSQL ---------------------------------------------------------------------------
_FIXTURE_SQL = f"""
SET password_encryption = 'scram-sha-256';
CREATE ROLE alice LOGIN PASSWORD '{PASSWORDS["alice"]}';
CREATE ROLE bob LOGIN PASSWORD '{PASSWORDS["bob"]}';
CREATE ROLE trusted_user LOGIN;
SET password_encryption = 'md5';
CREATE ROLE md5_user LOGIN PASSWORD '{PASSWORDS["md5_user"]}';
RESET password_encryption;
CREATE DATABASE app OWNER alice;
GRANT CONNECT ON DATABASE postgres TO alice, bob;
GRANT CONNECT ON DATABASE app TO alice, bob;
"""


@pytest.fixture(scope="session")
def pg() -> Iterator[EmbeddedPostgres]:
    """One real PostgreSQL for the whole session, with roles alice/bob/md5_user/trusted_user
    and database `app` (owner alice). Superuser: postgres/postgres."""
    base = make_traversable_tmpdir("pgsluice-test-")
    server = EmbeddedPostgres(base / "data",
                              extra_conf={"shared_preload_libraries": "pg_stat_statements"})
    try:
        server.start()
        # First matching line wins, so these go in front of initdb's scram host lines.
        server.add_hba("host all md5_user 127.0.0.1/32 md5")
        server.add_hba("host all trusted_user 127.0.0.1/32 trust")
        server.psql(_FIXTURE_SQL)
        server.psql("GRANT USAGE, CREATE ON SCHEMA public TO alice, bob;", db="app")
        # the change feed in both databases: every test through pgsluice also runs its cache
        from cache.feed import INSTALL
        for db in ("postgres", "app"):
            server.psql(INSTALL, db=db)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_tmp_dir() -> Iterator[Path]:
    """A scratch dir for tests that run their own EmbeddedPostgres; removed afterwards."""
    path = make_traversable_tmpdir("pgsluice-scratch-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _pg_log_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """For tests using `pg`: print what the server logged during a failed test."""
    if "pg" not in request.fixturenames:
        yield
        return
    server: EmbeddedPostgres = request.getfixturevalue("pg")
    offset = server.logfile.stat().st_size if server.logfile.exists() else 0
    yield
    if request_failed(request):
        print(f"\n--- postgres log during this test ({server.logfile}) ---")
        print(server.log_tail(150, since=offset) or "(nothing logged)")


# -- proxy subprocesses -------------------------------------------------------------------
def _start_proxy(pg: EmbeddedPostgres, log_dir: Path, started: list[ProxyHandle],
                 *extra_args: str, env: Mapping[str, str] | None = None,
                 listen_host: str = "127.0.0.1") -> ProxyHandle:
    host = "127.0.0.1" if listen_host == "0.0.0.0" else listen_host
    port = free_port(host)
    cmd = [sys.executable, "-m", "proxy", "serve", "--upstream", pg.dsn(),
           "--listen", f"{listen_host}:{port}", *extra_args]  # fmt: skip
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": pythonpath,
                "PGSLUICE_METRICS_LISTEN": "127.0.0.1:0", "PGSLUICE_WORKERS": "1",
                "PGSLUICE_GRPC_LISTEN": "", **(env or {})}
    log_path = log_dir / f"proxy-{len(started)}-{port}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd, cwd=REPO_ROOT, env=full_env,
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    handle = ProxyHandle(proc=proc, host=host, port=port, log_path=log_path, args=cmd)
    started.append(handle)
    try:
        wait_until(lambda: proc.poll() is not None or port_open(host, port),
                   timeout=PROXY_START_TIMEOUT)  # fmt: skip
    except TimeoutError:
        handle.stop()
        pytest.fail(
            f"proxy did not listen on {host}:{port} within {PROXY_START_TIMEOUT}s\n"
            f"cmd: {cmd}\nlog:\n{handle.log_text()}",
            pytrace=False,
        )
    if proc.poll() is not None:
        pytest.fail(
            f"proxy exited with {proc.returncode} before listening\n"
            f"cmd: {cmd}\nlog:\n{handle.log_text()}",
            pytrace=False,
        )
    return handle


def _stop_proxies(started: list[ProxyHandle], show_logs: bool) -> None:
    for handle in started:
        code = handle.stop()
        if show_logs:
            print(f"\n--- proxy on port {handle.port} (exit {code}) {handle.log_path} ---")
            print(handle.log_text())


@pytest.fixture
def proxy_factory(
    pg: EmbeddedPostgres, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ProxyFactory]:
    """Start `python -m proxy serve --upstream <pg> --listen 127.0.0.1:<port> *extra_args`
    and wait until it accepts TCP. Call as ``proxy_factory(*extra_args, env={...})``;
    ``listen_host`` listens elsewhere (e.g. on a test network namespace's veth)."""
    started: list[ProxyHandle] = []

    def start(*extra_args: str, env: Mapping[str, str] | None = None,
              listen_host: str = "127.0.0.1") -> ProxyHandle:
        return _start_proxy(pg, tmp_path, started, *extra_args, env=env, listen_host=listen_host)

    yield start
    _stop_proxies(started, request_failed(request))


@pytest.fixture(scope="module")
def proxy_factory_module(pg: EmbeddedPostgres, tmp_path_factory: pytest.TempPathFactory
                         ) -> Iterator[ProxyFactory]:  # fmt: skip
    """Like proxy_factory, for proxies shared by a module's tests (logs kept in a temp dir)."""
    started: list[ProxyHandle] = []
    log_dir = tmp_path_factory.mktemp("proxy-logs")

    def start(*extra_args: str, env: Mapping[str, str] | None = None,
              listen_host: str = "127.0.0.1") -> ProxyHandle:
        return _start_proxy(pg, log_dir, started, *extra_args, env=env, listen_host=listen_host)

    yield start
    _stop_proxies(started, False)


@pytest.fixture
def proxy(proxy_factory: ProxyFactory) -> ProxyHandle:
    """A proxy with default settings in front of the session `pg`."""
    return proxy_factory()
