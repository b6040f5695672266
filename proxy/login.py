"""Client login: startup packet, client authentication, and the welcome a client gets.

Rules: every refusal is an ErrorResponse with the SQLSTATE Postgres would send
(Postgres's own bytes when Postgres refused); a cleartext password is only asked
for over loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
from typing import TYPE_CHECKING, Protocol

from .admin import ADMIN_DB
from .admin import welcome as admin_welcome
from .backend import Backend, Credentials, LoginError, NeedPassword, connect
from .pgwire import codes, encode
from .pgwire.decode import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
    parse_password,
    parse_sasl_initial,
)
from .pgwire.errors import (
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    INVALID_AUTHORIZATION,
    INVALID_PASSWORD,
    PROTOCOL_VIOLATION,
    TOO_MANY_CONNECTIONS,
    PgError,
)
from .pgwire.scram import ScramError, ScramServer, make_scram_secret
from .settings import settings_from_startup

if TYPE_CHECKING:
    from .pool import Pool
    from .server import Server


class LoginIO(Protocol):
    """What login needs from a client connection."""

    peer: object

    async def read_packet(self) -> bytes: ...
    async def read_message(self) -> tuple[int, bytes]: ...
    def write(self, data: bytes) -> None: ...
    def take_place(self) -> bool: ...


class LoginResult:
    """pool None: the admin console."""

    __slots__ = ("database", "params", "pool", "settings", "user", "welcome")

    def __init__(self, user: str, database: str, params: dict[str, str], pool: Pool | None,
                 settings: tuple[tuple[str, str], ...], welcome: dict[str, str]) -> None:
        self.user = user
        self.database = database
        self.params = params
        self.pool = pool
        self.settings = settings
        self.welcome = welcome


class CancelOnly(Exception):
    """The connection was a CancelRequest; it has been handled."""


async def read_startup(io: LoginIO, server: Server) -> StartupMessage:
    while True:
        packet = decode_startup(await io.read_packet())
        if isinstance(packet, SSLRequest | GSSENCRequest):
            io.write(b"N")  # TLS and GSS encryption come later
            continue
        if isinstance(packet, CancelRequest):
            # Shielded: a client may hang up right after sending it; the cancel still goes.
            await asyncio.shield(server.spawn(server.cancel(packet.pid, packet.secret)))
            raise CancelOnly()
        return packet


def password_failed(user: str) -> PgError:
    return PgError(INVALID_PASSWORD, f'password authentication failed for user "{user}"',
                   severity="FATAL")


async def login(io: LoginIO, server: Server) -> LoginResult:
    startup = await read_startup(io, server)
    params = startup.params
    extensions = [k for k in params if k.startswith("_pq_.")]
    if startup.minor > 0 or extensions:
        io.write(encode.negotiate_protocol_version(0, extensions))
    for key in extensions:
        del params[key]
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise PgError(FEATURE_NOT_SUPPORTED, "pgsluice does not proxy replication connections",
                      severity="FATAL")
    user = params.get("user", "")
    if not user:
        raise PgError(INVALID_AUTHORIZATION,
                      "no PostgreSQL user name specified in startup packet", severity="FATAL")
    database = params.get("database") or user
    if database != ADMIN_DB and not io.take_place():  # the admin console is always let in
        raise PgError(TOO_MANY_CONNECTIONS, "sorry, too many clients already", severity="FATAL")
    settings = settings_from_startup(params)
    if database == ADMIN_DB:
        await _admin_login(io, server, user)
        return LoginResult(user, database, params, None, (), admin_welcome(server))

    mode = server.config.auth_mode
    if mode == "passthrough":
        pool, probe = await _passthrough(io, server, user, database)
    else:
        creds = await _auth_file(io, server, user) if mode == "auth_file" else server.default_creds(user)
        io.write(encode.auth_ok())
        pool, probe = server.pool(database, user), None
        if mode == "auth_file":
            pool.creds = creds
    try:
        welcome = await _welcome(pool, settings, probe)
    except (LoginError, PgError):
        if pool.size == 0 and not pool.waiters:
            server.pools.pop(pool.key, None)  # a mistyped database leaves no pool behind
        raise
    return LoginResult(user, database, params, pool, settings, welcome)


async def _admin_login(io: LoginIO, server: Server, user: str) -> None:
    """The admin console: the user authenticates as for any database (in passthrough mode,
    Postgres checks the password against the upstream URL's database), then must be an admin."""
    mode = server.config.auth_mode
    if mode == "passthrough":
        pool, probe = await _passthrough(io, server, user, server.admin_database())
        if probe is not None:
            pool.release(probe)
    elif mode == "auth_file":
        await _auth_file(io, server, user)
        io.write(encode.auth_ok())
    else:
        io.write(encode.auth_ok())
    if user not in server.admin_users():
        raise PgError(INSUFFICIENT_PRIVILEGE, f'pgsluice: user "{user}" may not use the admin console',
                      severity="FATAL", hint="Admins are listed in the admin_users setting.")


# ---- passthrough: Postgres decides ---------------------------------------------------------

async def _passthrough(io: LoginIO, server: Server, user: str,
                       database: str) -> tuple[Pool, Backend | None]:
    pool = server.pools.get((database, user))
    if pool is not None and pool.trusted:
        io.write(encode.auth_ok())
        return pool, None
    known = pool.creds.password if pool is not None else None
    if known is None:
        try:
            backend = await _server_login(io, server, user, database, Credentials())
        except NeedPassword:
            pass
        else:
            pool = server.pool(database, user)
            pool.trusted = True
            pool.adopt(backend)
            io.write(encode.auth_ok())
            return pool, backend
    password = await _ask_cleartext(io, user)
    if pool is not None and known is not None and hmac.compare_digest(
            password.encode(), known.encode()):
        io.write(encode.auth_ok())
        return pool, None
    try:
        backend = await _server_login(io, server, user, database, Credentials(password=password))
    except NeedPassword:
        raise password_failed(user) from None
    pool = server.pool(database, user)
    pool.creds.password = password
    pool.adopt(backend)
    io.write(encode.auth_ok())
    return pool, backend


async def _server_login(io: LoginIO, server: Server, user: str, database: str,
                        creds: Credentials) -> Backend:
    try:
        return await connect(server.upstream, user, database, creds, server.config.connect_timeout)
    except LoginError as err:
        if err.after_auth:
            io.write(encode.auth_ok())  # Postgres authenticates before it looks up the database
        raise


def _is_local(peer: object) -> bool:
    if isinstance(peer, tuple) and peer:
        try:
            return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
        except ValueError:
            return False
    return isinstance(peer, str)  # unix socket


async def _ask_cleartext(io: LoginIO, user: str) -> str:
    if not _is_local(io.peer):
        raise PgError(INVALID_AUTHORIZATION,
                      "pgsluice: password authentication in passthrough mode needs a loopback "
                      "connection until TLS is supported", severity="FATAL",
                      hint="Use auth_mode = auth_file for remote clients.")
    io.write(encode.auth_request(codes.AUTH_CLEARTEXT))
    code, body = await io.read_message()
    if code != codes.F_PASSWORD:
        raise PgError(PROTOCOL_VIOLATION, f"expected password response, got message type {code}",
                      severity="FATAL")
    try:
        return parse_password(body).decode()
    except UnicodeDecodeError:
        raise password_failed(user) from None


# ---- auth_file: pgsluice decides --------------------------------------------------------------

async def _auth_file(io: LoginIO, server: Server, user: str) -> Credentials:
    cred = server.userlist.get(user)
    if cred is not None and cred.kind == "md5":
        salt = secrets.token_bytes(4)
        io.write(encode.auth_request(codes.AUTH_MD5, salt))
        code, body = await io.read_message()
        if code != codes.F_PASSWORD:
            raise PgError(PROTOCOL_VIOLATION, "expected password response", severity="FATAL")
        from .pgwire.scram import md5_response
        expected = md5_response(user, cred.value, salt)
        if not hmac.compare_digest(parse_password(body), expected):
            raise password_failed(user)
        return Credentials(md5=cred.value)
    if cred is None:
        secret = make_scram_secret(secrets.token_hex(16))  # fail after a full exchange
    elif cred.scram is not None:
        secret = cred.scram
    else:
        secret = server.scram_secret_for(user, cred.value)
    scram = ScramServer(secret)
    io.write(encode.auth_sasl(["SCRAM-SHA-256"]))
    try:
        code, body = await io.read_message()
        if code != codes.F_PASSWORD:
            raise PgError(PROTOCOL_VIOLATION, "expected SASL response", severity="FATAL")
        mechanism, first = parse_sasl_initial(body)
        if mechanism != "SCRAM-SHA-256":
            raise PgError(PROTOCOL_VIOLATION, "client selected an invalid SASL authentication "
                          "mechanism", severity="FATAL")
        io.write(encode.auth_request(codes.AUTH_SASL_CONTINUE, scram.server_first(first)))
        code, body = await io.read_message()
        if code != codes.F_PASSWORD:
            raise PgError(PROTOCOL_VIOLATION, "expected SASL response", severity="FATAL")
        final = scram.server_final(body)
    except ScramError:
        raise password_failed(user) from None
    if cred is None:
        raise password_failed(user)
    io.write(encode.auth_request(codes.AUTH_SASL_FINAL, final))
    if cred.kind == "plain":
        return Credentials(password=cred.value)
    return Credentials(scram_keys=(scram.client_key, secret.server_key))


# ---- welcome: the ParameterStatus set Postgres would report for these settings ---------------

async def _welcome(pool: Pool, settings: tuple[tuple[str, str], ...],
                   probe: Backend | None) -> dict[str, str]:
    cached = pool.status_cache.get(settings)
    if cached is None:
        backend = probe if probe is not None else await pool.acquire()
        try:
            backend.applied = None
            await resync(backend, settings)
        except BaseException:
            pool.discard(backend)
            raise
        # Postgres reports a parameter only when it differs from what it last reported on
        # that connection, so what the resync reported is not enough (the previous client
        # may have left the same value): every value as last reported is this session's.
        cached = dict(backend.params)
        pool.release(backend)
        pool.status_cache[settings] = cached
    elif probe is not None:
        pool.release(probe)
    return dict(cached)


async def resync(backend: Backend, settings: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Bring a backend's session settings to `settings`; returns the ParameterStatus it reported.

    A failing setting is the client's error (bad TimeZone at startup, say): raised as
    PgError with Postgres's SQLSTATE and message.
    """
    statements = [sql for _, sql in settings]
    if backend.applied is None or backend.applied:
        statements.insert(0, "RESET ALL")
    if not statements:
        backend.applied = settings
        return {}
    result = await backend.run(";".join(statements))
    if result.error is not None:
        backend.applied = None
        err = result.error
        raise PgError(err.get("C", "XX000"), err.get("M", "could not apply session settings"),
                      severity="FATAL", detail=err.get("D"), hint=err.get("H"))
    backend.applied = settings
    return result.params
