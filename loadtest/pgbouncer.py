"""Start and stop a throwaway PgBouncer (transaction pooling) for benchmarks."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PGBOUNCER_BIN = "/usr/sbin/pgbouncer"
# PgBouncer refuses to run as root; these are tried in order when euid == 0.
UNPRIVILEGED_USERS = ("pgsluice-pg", "nobody")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float, what: str) -> None:
    """Wait until host:port accepts TCP connections; fail early if proc exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM the process group we created for proc, then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def pgbouncer_version(binary: str = PGBOUNCER_BIN) -> tuple[str, tuple[int, int]]:
    """('PgBouncer 1.18.0', (1, 18))."""
    out = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, timeout=30, check=False
    ).stdout
    first = out.strip().splitlines()[0] if out.strip() else "PgBouncer unknown"
    m = re.search(r"(\d+)\.(\d+)", first)
    return first, ((int(m.group(1)), int(m.group(2))) if m else (0, 0))


def _quote_userlist(s: str) -> str:
    return '"' + s.replace('"', '""') + '"'


def _run_as() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    for name in UNPRIVILEGED_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError(f"running as root and none of {UNPRIVILEGED_USERS} exists for PgBouncer")


class PgBouncer:
    """A PgBouncer in transaction pooling mode in front of one upstream database.

    Use as a context manager; everything (process, temp dir) is removed on exit.
    """

    def __init__(
        self,
        *,
        upstream_host: str,
        upstream_port: int,
        database: str,
        user: str,
        password: str,
        pool_size: int,
        binary: str = PGBOUNCER_BIN,
        auth_type: str = "scram-sha-256",
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.database = database
        self.user = user
        self.password = password
        self.pool_size = pool_size
        self.binary = binary
        self.auth_type = auth_type
        self.host = "127.0.0.1"
        self.port = 0
        self.version, self.version_tuple = pgbouncer_version(binary)
        # max_prepared_statements (protocol-level prepared statements) exists from 1.21 on.
        self.supports_prepared = self.version_tuple >= (1, 21)
        self.tmpdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def ini_text(self) -> str:
        assert self.tmpdir is not None
        lines = [
            "[databases]",
            f"{self.database} = host={self.upstream_host} port={self.upstream_port} dbname={self.database}",
            "",
            "[pgbouncer]",
            f"listen_addr = {self.host}",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            f"auth_type = {self.auth_type}",
            f"auth_file = {self.tmpdir / 'userlist.txt'}",
            f"logfile = {self.tmpdir / 'pgbouncer.log'}",
            "pool_mode = transaction",
            f"default_pool_size = {self.pool_size}",
            "min_pool_size = 0",
            "reserve_pool_size = 0",
            "max_client_conn = 2000",
            "ignore_startup_parameters = extra_float_digits,options",
            "log_connections = 0",
            "log_disconnections = 0",
        ]
        if self.supports_prepared:
            lines.append("max_prepared_statements = 200")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15) -> None:
        user = _run_as()
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pgsluice-pgbouncer-"))
        self.port = free_port(self.host)
        ini = self.tmpdir / "pgbouncer.ini"
        userlist = self.tmpdir / "userlist.txt"
        ini.write_text(self.ini_text())
        userlist.write_text(f"{_quote_userlist(self.user)} {_quote_userlist(self.password)}\n")
        # Only the PgBouncer user may read the password file; it writes its log here too.
        for path in (self.tmpdir, ini, userlist):
            path.chmod(0o700 if path.is_dir() else 0o600)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
        self.proc = subprocess.Popen(
            [self.binary, str(ini)],
            cwd=self.tmpdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C goes to us; we stop it in stop()
            user=user.pw_uid if user else None,
            group=user.pw_gid if user else None,
            extra_groups=[] if user else None,
        )
        try:
            wait_for_port(self.host, self.port, self.proc, timeout, "PgBouncer")
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- pgbouncer.log ---\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 20) -> str:
        if self.tmpdir is None:
            return ""
        log = self.tmpdir / "pgbouncer.log"
        if not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        try:
            if self.proc is not None:
                stop_process(self.proc)
        finally:
            self.proc = None
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def __enter__(self) -> PgBouncer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
