"""Start and stop a throwaway pgpool-II (Debian's `pgpool2`) with its in-memory query cache.

One backend (the primary of streaming-replication mode, without standbys: no load balancing,
no health or replication checks),
connection pooling on, the query cache in shared memory invalidated per table as writes pass
through it. Everything it writes (config, pool_passwd, pid file, logs, the cache's oid maps,
sockets) lives in a temp dir removed on exit; it listens on loopback only.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from loadtest.pgbouncer import _run_as, free_port, stop_process, wait_for_port

PGPOOL_BIN = "/usr/sbin/pgpool"


def pgpool_version(binary: str = PGPOOL_BIN) -> str:
    """'pgpool-II version 4.3.5 (tamahomeboshi)'."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0].rstrip(",") if text else "pgpool-II unknown"


def _q(value: str | int) -> str:
    """A pgpool.conf value: numbers bare, strings single-quoted."""
    return str(value) if isinstance(value, int) else "'" + value.replace("'", "''") + "'"


class PgPool:
    """pgpool-II in front of one Postgres, each client served by one of `children` processes
    (pgpool has no transaction pooling: a client holds its child, and the child its cached
    backend connection, for the whole session). Use as a context manager."""

    def __init__(self, *, upstream_host: str, upstream_port: int, user: str, password: str,
                 children: int, cache_mb: int = 256, binary: str = PGPOOL_BIN) -> None:
        self.upstream_host, self.upstream_port = upstream_host, upstream_port
        self.user, self.password = user, password
        self.children, self.cache_mb, self.binary = children, cache_mb, binary
        self.host, self.port = "127.0.0.1", 0
        self.version = pgpool_version(binary)
        self.tmpdir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    def settings(self) -> dict[str, str | int]:
        assert self.tmpdir is not None
        tmp = str(self.tmpdir)
        return {
            # streaming-replication mode with the one primary, as most pgpool-II users run it; raw
            # mode leaves an internal transaction open after an extended-protocol UPDATE (4.3.5;
            # pgpool/pgpool2 issue 172), which pgbench -M extended stops on
            "backend_clustering_mode": "streaming_replication",
            "listen_addresses": self.host, "port": self.port, "socket_dir": tmp,
            "pcp_listen_addresses": "", "pcp_port": free_port(self.host), "pcp_socket_dir": tmp,
            "wd_ipc_socket_dir": tmp, "use_watchdog": "off",
            "backend_hostname0": self.upstream_host, "backend_port0": self.upstream_port,
            "backend_weight0": 1, "backend_flag0": "ALWAYS_PRIMARY|DISALLOW_TO_FAILOVER",
            "sr_check_user": self.user, "sr_check_password": "",  # "": from pool_passwd
            # clients are authenticated with the password pgpool also logs in to Postgres with
            "enable_pool_hba": "off", "pool_passwd": "pool_passwd",
            "num_init_children": self.children, "max_pool": 1, "reserved_connections": 0,
            "connection_cache": "on", "child_life_time": 0, "child_max_connections": 0,
            "connection_life_time": 0, "client_idle_limit": 0,
            "load_balance_mode": "off", "sr_check_period": 0, "health_check_period": 0,
            "failover_on_backend_error": "off",
            "log_destination": "stderr", "logging_collector": "off", "log_min_messages": "warning",
            "log_connections": "off", "log_statement": "off", "log_per_node_statement": "off",
            "pid_file_name": str(self.tmpdir / "pgpool.pid"), "logdir": tmp,
            "memory_cache_enabled": "on", "memqcache_method": "shmem",
            "memqcache_total_size": f"{self.cache_mb}MB", "memqcache_max_num_cache": 1_000_000,
            "memqcache_expire": 0, "memqcache_auto_cache_invalidation": "on",
            "memqcache_maxcache": "400kB", "memqcache_cache_block_size": "1MB",
            "memqcache_oiddir": str(self.tmpdir / "oiddir"),
        }

    def start(self, timeout: float = 30) -> None:
        user = _run_as()  # pgpool runs as root too, but as PgBouncer does not, neither does it
        self.tmpdir = Path(tempfile.mkdtemp(prefix="pgsluice-pgpool-"))
        self.port = free_port(self.host)
        (self.tmpdir / "oiddir").mkdir()
        conf = self.tmpdir / "pgpool.conf"
        conf.write_text("".join(f"{k} = {_q(v)}\n" for k, v in self.settings().items()))
        (self.tmpdir / "pool_passwd").write_text(f"{self.user}:TEXT{self.password}\n")
        (self.tmpdir / "pcp.conf").write_text("")
        (self.tmpdir / "pool_hba.conf").write_text("")
        for path in (self.tmpdir, *self.tmpdir.iterdir()):  # only pgpool's user reads the password
            path.chmod(0o700 if path.is_dir() else 0o600)
            if user is not None:
                os.chown(path, user.pw_uid, user.pw_gid)
        log = open(self.tmpdir / "pgpool.log", "wb")  # noqa: SIM115 - the process keeps it open
        try:
            self.proc = subprocess.Popen(
                [self.binary, "-n", "-D", "-f", str(conf), "-F", str(self.tmpdir / "pcp.conf"),
                 "-a", str(self.tmpdir / "pool_hba.conf")],
                cwd=self.tmpdir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True, env={**os.environ, "HOME": str(self.tmpdir)},
                user=user.pw_uid if user else None, group=user.pw_gid if user else None,
                extra_groups=[] if user else None,
            )  # fmt: skip
        finally:
            log.close()
        try:
            wait_for_port(self.host, self.port, self.proc, timeout, "pgpool-II")
        except Exception as exc:
            raise RuntimeError(f"{exc}\n--- pgpool.log ---\n{self.log_tail()}") from exc

    def log_tail(self, lines: int = 30) -> str:
        log = self.tmpdir / "pgpool.log" if self.tmpdir is not None else None
        if log is None or not log.exists():
            return "(no log)"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])

    def errors(self) -> list[str]:
        """ERROR/FATAL/PANIC lines of its log so far (a benchmark shows them, not hides them)."""
        log = self.tmpdir / "pgpool.log" if self.tmpdir is not None else None
        if log is None or not log.exists():
            return []
        return [line for line in log.read_text(errors="replace").splitlines()
                if re.search(r"\b(ERROR|FATAL|PANIC):", line)]

    def stop(self) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                # SIGINT is pgpool's fast shutdown: it removes its shared memory, SIGKILL would not
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    stop_process(self.proc)
        finally:
            self.proc = None
            if self.tmpdir is not None:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def __enter__(self) -> PgPool:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
