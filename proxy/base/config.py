"""The one typed configuration object, from CLI flags > PGSLUICE_* environment > TOML file > defaults.

Every setting is a field of Config; its CLI flag is `--name-with-dashes` and its
environment variable `PGSLUICE_NAME`. Secrets are masked whenever config is shown.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from planner.policy import Policies, Policy, PolicyError
from proxy.base.errors import ConfigError
from proxy.base.tls import check_files

AuthMode = Literal["passthrough", "auth_file", "trust"]
LogFormat = Literal["text", "json", "logfmt"]
TlsMode = Literal["disable", "allow", "require"]
ServerTlsMode = Literal["disable", "prefer", "require", "verify-ca", "verify-full"]
# PgBouncer's default since 1.21: a role that cannot log in, or whose password has expired,
# has no usable secret, so it cannot get in through pgsluice either.
DEFAULT_AUTH_QUERY = ("SELECT rolname, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END "
                      "FROM pg_authid WHERE rolname = $1 AND rolcanlogin")


@dataclass(frozen=True, slots=True)
class AgentAuth:
    """[pgsluice.agents.NAME]: a bearer token for the gRPC and MCP doors and who it runs as."""

    name: str
    token: str
    user: str
    password: str | None = None
    database: str = ""  # default database ("" = the upstream URL's)


@dataclass(frozen=True, slots=True)
class Config:
    upstream: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    listen: str = "127.0.0.1:6543"
    auth_mode: AuthMode = "passthrough"
    auth_file: str = ""
    auth_user: str = ""  # who runs auth_query ("" = the upstream URL's user)
    auth_password: str = ""  # its password ("" = the upstream URL's, when it is that user)
    auth_query: str = DEFAULT_AUTH_QUERY  # a user's SCRAM/md5 secret, fetched per login ("" = off)
    tls_mode: TlsMode = "allow"  # TLS towards clients, once tls_cert and tls_key are set
    tls_cert: str = ""  # PEM certificate chain of the wire door, the gRPC door and /metrics
    tls_key: str = ""
    tls_ca: str = ""  # PEM CA bundle: clients must present a certificate it signed
    server_tls_mode: ServerTlsMode = "prefer"  # TLS towards Postgres, as libpq's sslmode
    server_tls_ca: str = ""  # CA bundle for verify-ca / verify-full ("" = the system's)
    pool_min_size: int = 0
    pool_max_size: int = 20
    pool_acquire_timeout: float = 5.0
    max_client_conn: int = 1000
    max_message_size: int = 64 * 1024 * 1024
    connect_timeout: float = 5.0
    login_timeout: float = 15.0
    server_idle_timeout: float = 600.0
    server_lifetime: float = 3600.0
    server_check_delay: float = 30.0
    max_prepared_statements: int = 1000
    idle_transaction_timeout: float = 0.0  # s a client may sit idle inside a transaction (0 = off)
    shutdown_timeout: float = 30.0
    log_level: str = "info"
    log_format: LogFormat = "text"
    uvloop: bool = True
    cache: bool = True  # answer repeated reads from cache (see README, "Cache")
    cache_max_bytes: int = 256 * 1024 * 1024
    cache_max_entry: int = 1024 * 1024  # larger results are not cached
    cache_ttl: float = 60.0  # seconds: the last safety net
    cache_requires_feed: bool = True  # cache a table only while the change feed covers it
    batching: bool = True  # burst batching: point reads of one shape in flight run as one (README)
    batch_max: int = 500  # reads in one batch at most
    change_feed: bool = True  # LISTEN to the change feed where it is installed
    redis: str = ""  # redis://[:password@]host:port/db: shared tier, versions and pub/sub
    redis_timeout_ms: float = 50.0  # never wait on Redis longer than this
    replicas: tuple[str, ...] = ()  # streaming replicas' postgresql:// URLs (host, port, dbname)
    replica_max_lag: float = 1.0  # s: a replica further behind is out of rotation
    slow_query_ms: float = 1000.0  # requests slower than this get a log line (0 = off)
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)  # processes on the same ports
    admin_users: str = ""  # comma-separated users allowed in the admin console (default: upstream's)
    metrics_listen: str = "127.0.0.1:9187"  # Prometheus /metrics ("" = off)
    metrics_tls: bool = False  # serve /metrics over HTTPS (tls_cert, tls_key, tls_ca)
    grpc_listen: str = "127.0.0.1:50051"  # the gRPC door ("" = off)
    idempotency_window: float = 600.0  # seconds a gRPC idempotency key is remembered
    mcp_listen: str = ""  # the MCP door, Streamable HTTP on HOST:PORT, path /mcp ("" = off)
    mcp_agent: str = ""  # `pgsluice mcp` (stdio) runs as this agent ("" = the only one configured)
    mcp_max_rows: int = 500  # rows in one MCP tool result at most (more: cut, and said so)
    mcp_max_bytes: int = 64 * 1024  # bytes of JSON rows in one MCP tool result at most
    roles: Policies = field(default_factory=Policies)  # [pgsluice.roles.NAME]: guardrails per role
    agents: tuple[AgentAuth, ...] = ()  # [pgsluice.agents.NAME]: gRPC and MCP bearer tokens

    @property
    def listen_host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def listen_port(self) -> int:
        return split_host_port(self.listen)[1]

    def masked(self) -> dict[str, Any]:
        """The config as a dict with every secret replaced by ***."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("roles", "agents")}
        out["upstream"] = mask_url(self.upstream)
        out["redis"] = mask_url(self.redis)
        out["replicas"] = [mask_url(r) for r in self.replicas]
        out["auth_password"] = "***" if self.auth_password else ""
        if self.roles.roles:
            out["roles"] = {r.name: _role_dict(r) for r in self.roles.roles}
        if self.agents:
            out["agents"] = {a.name: {"token": "***", "user": a.user, "database": a.database,
                                      "password": "***" if a.password else ""} for a in self.agents}
        return out


SECRET_FIELDS = frozenset({"upstream", "redis", "auth_password", "replicas"})


def _role_dict(policy: Policy) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(policy):
        value = getattr(policy, f.name)
        if f.name == "name" or value in (None, (), frozenset()):
            continue
        out[f.name] = sorted(value) if isinstance(value, frozenset) else \
            list(value) if isinstance(value, tuple) else value
    return out


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass(frozen=True, slots=True)
class UpstreamURL:
    host: str
    port: int
    user: str
    password: str | None
    database: str


def parse_upstream(url: str) -> UpstreamURL:
    """Parse postgresql://USER:PASS@HOST:PORT/DB (host may be a unix socket dir via ?host=).

    >>> u = parse_upstream("postgresql://al%40ice:s3cret@db.local:5433/app")
    >>> (u.user, u.password, u.host, u.port, u.database)
    ('al@ice', 's3cret', 'db.local', 5433, 'app')
    """
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"upstream must be a postgresql:// URL, got {mask_url(url)!r}")
    query = dict(p.split("=", 1) for p in parts.query.split("&") if "=" in p)
    host = unquote(query.get("host", "")) or parts.hostname or "127.0.0.1"
    try:
        port = int(query.get("port", "") or parts.port or 5432)
    except ValueError as exc:
        raise ConfigError(f"bad port in upstream URL {mask_url(url)!r}") from exc
    user = unquote(parts.username or "") or os.environ.get("USER", "postgres")
    password = unquote(parts.password) if parts.password is not None else None
    database = unquote(parts.path.lstrip("/")) or user
    return UpstreamURL(host, port, user, password, database)


def mask_url(url: str) -> str:
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


def _coerce(name: str, raw: Any, kind: Any, source: str) -> Any:
    try:
        if name == "replicas":
            return _replicas(raw)
        if kind is bool or kind == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is int or kind == "int":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return int(raw)
        if kind is float or kind == "float":
            if isinstance(raw, bool):
                raise ValueError(raw)
            return float(raw)
        allowed = get_args(_field_types[name])
        if allowed:
            if raw not in allowed:
                raise ValueError(f"{raw!r} (choose one of {', '.join(allowed)})")
            return raw
        if not isinstance(raw, str):
            raise ValueError(raw)
        if name == "listen" or (name in ("metrics_listen", "grpc_listen", "mcp_listen") and raw):
            split_host_port(raw)
        elif name == "upstream":
            parse_upstream(raw)
        elif name == "redis" and raw and not raw.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected a redis:// URL, got {mask_url(raw)!r}")
        return raw
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: invalid value for {name}: {exc}") from None


def _replicas(raw: Any) -> tuple[str, ...]:
    """A TOML list, or a comma-separated string (flag, environment); each a postgresql:// URL."""
    if isinstance(raw, str):
        raw = [part.strip() for part in raw.split(",") if part.strip()]
    if not isinstance(raw, list | tuple) or not all(isinstance(url, str) for url in raw):
        raise ValueError("expected a list of postgresql:// URLs")
    for url in raw:
        parse_upstream(url)
    return tuple(raw)


_field_types: dict[str, Any] = {
    "auth_mode": AuthMode, "log_format": LogFormat, "tls_mode": TlsMode, "server_tls_mode": ServerTlsMode,
}


def _field_kinds() -> dict[str, Any]:
    kinds: dict[str, Any] = {}
    for f in fields(Config):
        if f.name in ("roles", "agents"):  # tables in the TOML file only
            continue
        kinds[f.name] = f.type
        _field_types.setdefault(f.name, str)
    return kinds


FIELD_KINDS = _field_kinds()


def _toml_line(text: str, key: str) -> int:
    for lineno, line in enumerate(text.splitlines(), 1):
        if re.match(rf"\s*{re.escape(key)}\s*=", line):
            return lineno
    return 0


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; errors name the file and line."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read config file: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    section = data.get("pgsluice", data)
    if not isinstance(section, dict):
        raise ConfigError(f"{p}: [pgsluice] must be a table")
    out: dict[str, Any] = {}
    for key, value in section.items():
        name = key.replace("-", "_")
        where = f"{p}:{_toml_line(text, key)}"
        if name == "roles":
            try:
                out["roles"] = Policies.from_toml(value)
            except PolicyError as exc:
                raise ConfigError(f"{p}: {exc}") from None
            continue
        if name == "agents":
            out["agents"] = _agents(value, f"{p}:{_toml_line(text, key)}")
            continue
        if name not in FIELD_KINDS:
            raise ConfigError(f"{where}: unknown setting {key!r}")
        out[name] = _coerce(name, value, FIELD_KINDS[name], where)
    return out


def _agents(table: Any, where: str) -> tuple[AgentAuth, ...]:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: [pgsluice.agents] must be a table of agents")
    out = []
    for name, spec in table.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("token"), str) or not spec["token"] \
                or not isinstance(spec.get("user"), str):
            raise ConfigError(f"{where}: agent {name!r} needs token = \"...\" and user = \"...\"")
        unknown = set(spec) - {"token", "user", "password", "database"}
        if unknown:
            raise ConfigError(f"{where}: agent {name!r}: unknown keys {sorted(unknown)}")
        out.append(AgentAuth(str(name), spec["token"], spec["user"], spec.get("password"),
                             spec.get("database", "")))
    if len({a.token for a in out}) != len(out):
        raise ConfigError(f"{where}: two agents share a token")
    return tuple(out)


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         file: str | Path | None = None) -> Config:
    """Merge the layers; `flags` holds only the flags the user actually gave."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    file = file or env.get("PGSLUICE_CONFIG") or None
    if file:
        values.update(load_toml(file))
    for name, kind in FIELD_KINDS.items():
        var = "PGSLUICE_" + name.upper()
        if var in env:
            values[name] = _coerce(name, env[var], kind, f"environment {var}")
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, FIELD_KINDS[name], "--" + name.replace("_", "-"))
    config = Config(**values)
    validate(config)
    return config


def validate(config: Config) -> None:
    split_host_port(config.listen)
    parse_upstream(config.upstream)
    if config.pool_max_size < 1:
        raise ConfigError("pool_max_size must be at least 1")
    if not 0 <= config.pool_min_size <= config.pool_max_size:
        raise ConfigError("pool_min_size must be between 0 and pool_max_size")
    if config.auth_mode == "auth_file" and not config.auth_file:
        raise ConfigError("auth_mode = auth_file needs auth_file = PATH")
    if config.max_message_size < 1024:
        raise ConfigError("max_message_size must be at least 1024")
    if not 1 <= config.workers <= 256:
        raise ConfigError("workers must be between 1 and 256")
    if config.batch_max < 1:
        raise ConfigError("batch_max must be positive")
    if config.cache_max_bytes < 1 or config.cache_max_entry < 1:
        raise ConfigError("cache_max_bytes and cache_max_entry must be positive")
    _validate_tls(config)
    check_files(config)
    for name in ("pool_acquire_timeout", "connect_timeout", "login_timeout", "cache_ttl", "redis_timeout_ms"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"{name} must be positive")
    if config.mcp_max_rows < 1 or config.mcp_max_bytes < 1024:
        raise ConfigError("mcp_max_rows must be positive and mcp_max_bytes at least 1024")
    if config.replica_max_lag <= 0:
        raise ConfigError("replica_max_lag must be positive")
    if config.idle_transaction_timeout < 0:
        raise ConfigError("idle_transaction_timeout must be 0 (off) or positive")


def _validate_tls(config: Config) -> None:
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key go together")
    if config.tls_ca and not config.tls_cert:
        raise ConfigError("tls_ca (client certificates) needs tls_cert and tls_key")
    if config.tls_mode == "require" and not config.tls_cert:
        raise ConfigError("tls_mode = require needs tls_cert and tls_key")
    if config.metrics_tls and not config.tls_cert:
        raise ConfigError("metrics_tls needs tls_cert and tls_key")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(values: Mapping[str, Any]) -> str:
    lines = ["[pgsluice]"]
    for key, value in values.items():
        if key not in ("roles", "agents"):
            lines.append(f"{key} = {_toml_value(value)}")
    for name, role in (values.get("roles") or {}).items():
        lines += ["", f"[pgsluice.roles.{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in role.items()]
    return "\n".join(lines) + "\n"
